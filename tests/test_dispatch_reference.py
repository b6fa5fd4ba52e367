"""The single-process dispatch/combine oracle, checked against brute force and permute.

Every expectation here is computed independently of ``afdkit.dispatch.reference``: per
(rank, token, k) triple by hand, or through ``afdkit.moe.permute``/``unpermute`` on one
rank.
"""

from __future__ import annotations

import pytest
import torch

from afdkit import moe
from afdkit.dispatch.reference import (ReferenceHandle, check_dispatch_output, random_routing, read_tags,
                                       received_rows, reference_combine, reference_dispatch, tagged_tokens)
from afdkit.reference import dequantize_fp8, quantize_fp8
from afdkit.testing import calc_diff

HIDDEN = 512


def _inputs(gen, tokens_per_rank, num_experts, top_k, experts=None):
    xs, ids, ws = [], [], []
    for r, t in enumerate(tokens_per_rank):
        xs.append(tagged_tokens(r, t, HIDDEN, gen))
        i, w = random_routing(t, top_k, num_experts, gen, experts=experts)
        ids.append(i)
        ws.append(w)
    return xs, ids, ws


def _brute_force_rows(ids, num_experts, ranks):
    """Per rank: the (expert, source rank, source index, k) of each row, in contract order."""
    local = num_experts // ranks
    per_rank = [[] for _ in range(ranks)]
    for e in range(num_experts):
        for s, i in enumerate(ids):
            for t in range(i.shape[0]):
                for k in range(i.shape[1]):
                    if int(i[t, k]) == e:
                        per_rank[e // local].append((e, s, t, k))
    return per_rank


@pytest.mark.parametrize("quant", ["fp8", "none"])
@pytest.mark.parametrize("tokens_per_rank,num_experts,top_k", [((7, 5), 8, 3), ((6, 0, 9), 12, 2),
                                                               ((4, 4, 4), 6, 3)])
def test_dispatch_rows_match_brute_force(gen, quant, tokens_per_rank, num_experts, top_k):
    ranks = len(tokens_per_rank)
    xs, ids, ws = _inputs(gen, tokens_per_rank, num_experts, top_k)
    outs = reference_dispatch(xs, ids, ws, num_experts, quant, max_tokens_per_rank=10)
    expected = _brute_force_rows(ids, num_experts, ranks)
    local = num_experts // ranks
    for r, (out, rows) in enumerate(zip(outs, expected)):
        assert out.capacity == ranks * 10 * min(top_k, local)
        counts = [sum(1 for row in rows if row[0] == e) for e in range(r * local, (r + 1) * local)]
        assert out.counts.tolist() == counts
        assert out.offsets.tolist() == [0] + torch.tensor(counts).cumsum(0).tolist()
        h = out.handle
        assert isinstance(h, ReferenceHandle) and h.num_rows == len(rows)
        assert h.src_rank.tolist() == [row[1] for row in rows]
        assert h.src_index.tolist() == [row[2] for row in rows]
        assert h.topk_slot.tolist() == [row[3] for row in rows]
        assert torch.equal(h.weight, torch.tensor([float(ws[s][t, k]) for _, s, t, k in rows]))
        got = received_rows(out, quant)
        src_rank, src_index = read_tags(got)
        assert src_rank.tolist() == [row[1] for row in rows] and src_index.tolist() == [row[2] for row in rows]
        want = torch.stack([xs[s][t].float() for _, s, t, _ in rows]) if rows else got
        if quant == "none":
            assert torch.equal(got, want)
            assert (out.tokens[len(rows):] == 0).all()
        else:
            q, sc = quantize_fp8(want, "channel128")  # per row: a token quantizes alike wherever it goes
            assert torch.equal(out.tokens[:len(rows)].view(torch.uint8), q.view(torch.uint8))
            assert torch.equal(out.scales[:len(rows)], sc)
            assert calc_diff(got, want) < 1e-3


def test_one_rank_equals_permute(gen):
    x = torch.randn(37, HIDDEN, generator=gen).to(torch.bfloat16)
    ids, w = random_routing(37, 3, 8, gen)
    (out,) = reference_dispatch([x], [ids], [w], 8, "fp8")
    p = moe.permute(x, ids, 8, quant="fp8")
    assert torch.equal(out.counts, p.expert_counts) and torch.equal(out.offsets, p.expert_offsets)
    assert torch.equal(out.tokens[:37 * 3].view(torch.uint8), p.x.view(torch.uint8))
    assert torch.equal(out.scales[:37 * 3], p.scales)
    y = torch.randn(out.capacity, HIDDEN, generator=gen).to(torch.bfloat16)
    (combined,) = reference_combine([y], [out])
    want = moe.unpermute(y[:37 * 3], p, w)  # fp32 sums too, in (token, k) order instead of row order
    assert (combined.float() - want.float()).abs().max() <= 2 ** -7 * want.float().abs().max()
    assert calc_diff(combined, want) < 1e-5


def _exact_case(gen, tokens_per_rank, num_experts, top_k):
    """Inputs whose weighted sums are exact in bf16: tokens in -2..2, weights in {1/4 .. 1},
    experts scaling by at most 4: |sum| <= 24 in steps of 1/4, within bf16's 8 bits."""
    xs, ids, _ = _inputs(gen, tokens_per_rank, num_experts, top_k)
    xs = [torch.randint(-2, 3, x.shape, generator=gen).to(torch.bfloat16) for x in xs]
    ws = [torch.randint(1, 5, i.shape, generator=gen).float() / 4 for i in ids]
    return xs, ids, ws


@pytest.mark.parametrize("partial_dtype", [torch.bfloat16, torch.float32])
def test_combine_equals_weighted_sum_exactly(gen, partial_dtype):
    xs, ids, ws = _exact_case(gen, (9, 6, 11), 12, 3)
    outs = reference_dispatch(xs, ids, ws, 12, "none")
    # Expert e multiplies by (e % 4 + 1): the expected sum is then exact in fp32 and bf16.
    ys = []
    for r, out in enumerate(outs):
        y = torch.full((out.capacity, HIDDEN), float("nan"), dtype=torch.bfloat16)  # poison unused rows
        n = int(out.offsets[-1])
        expert = torch.repeat_interleave(torch.arange(4) + r * 4, out.counts.long())
        y[:n] = (out.tokens[:n].float() * (expert % 4 + 1)[:, None].float()).to(torch.bfloat16)
        ys.append(y)
    got = reference_combine(ys, outs, partial_dtype=partial_dtype)
    for s in range(3):
        factor = (ws[s] * (ids[s].long() % 4 + 1).float()).sum(1)
        want = (xs[s].double() * factor[:, None].double())
        assert torch.equal(got[s].double(), want), f"rank {s}"


def test_combine_rounds_each_partial_to_bf16(gen):
    """A token split over two ranks sums two bf16-rounded partials (the wire format)."""
    x = [torch.ones(1, HIDDEN, dtype=torch.bfloat16), torch.ones(0, HIDDEN, dtype=torch.bfloat16)]
    ids = [torch.tensor([[0, 2]], dtype=torch.int32), torch.zeros(0, 2, dtype=torch.int32)]
    w = [torch.tensor([[1.0, 1.0]]), torch.zeros(0, 2)]
    outs = reference_dispatch(x, ids, w, 4, "none")
    third = 1.0 + 2 ** -9  # not a bf16 value: rounds to 1.0
    ys = [torch.full((o.capacity, HIDDEN), third, dtype=torch.float32) for o in outs]
    bf16 = reference_combine(ys, outs)[0]
    fp32 = reference_combine(ys, outs, partial_dtype=torch.float32)[0]
    assert (bf16 == 2.0).all()
    assert (fp32.float() == torch.tensor(2 + 2 ** -8).to(torch.bfloat16).float()).all()


def test_empty_experts_single_hot_expert_and_zero_tokens(gen):
    # Only experts 1 and 5 are used: the others are empty on both ranks.
    xs, ids, ws = _inputs(gen, (8, 3), 8, 2, experts=[1, 5])
    outs = reference_dispatch(xs, ids, ws, 8, "fp8")
    assert outs[0].counts.tolist() == [0, 11, 0, 0] and outs[1].counts.tolist() == [0, 11, 0, 0]
    # All tokens of all ranks to expert 6 (top-1).
    xs, ids, ws = _inputs(gen, (5, 7), 8, 1, experts=[6])
    outs = reference_dispatch(xs, ids, ws, 8, "none")
    assert outs[0].counts.tolist() == [0, 0, 0, 0] and outs[1].counts.tolist() == [0, 0, 12, 0]
    assert int(outs[0].offsets[-1]) == 0 and (outs[0].tokens == 0).all()
    tags = read_tags(received_rows(outs[1], "none"))
    assert tags[0].tolist() == [0] * 5 + [1] * 7 and tags[1].tolist() == list(range(5)) + list(range(7))
    # Zero tokens everywhere.
    xs, ids, ws = _inputs(gen, (0, 0), 8, 2)
    outs = reference_dispatch(xs, ids, ws, 8, "fp8", max_tokens_per_rank=4)
    assert all(int(o.offsets[-1]) == 0 for o in outs)
    got = reference_combine([torch.zeros(o.capacity, HIDDEN) for o in outs], outs)
    assert [g.shape for g in got] == [torch.Size([0, HIDDEN])] * 2


def test_validation_errors(gen):
    xs, ids, ws = _inputs(gen, (4, 4), 8, 2)
    with pytest.raises(ValueError, match=r"expert ids must be in \[0, 8\)"):
        reference_dispatch(xs, [ids[0], ids[1] + 8], ws, 8)
    with pytest.raises(ValueError, match="exceed max_tokens_per_rank = 3"):
        reference_dispatch(xs, ids, ws, 8, max_tokens_per_rank=3)
    with pytest.raises(ValueError, match="multiple of the number of ranks"):
        reference_dispatch(xs, ids, ws, 7)
    with pytest.raises(TypeError, match="'x' must have dtype"):
        reference_dispatch([x.float() for x in xs], ids, ws, 8)
    with pytest.raises(ValueError, match="hidden % 128"):
        reference_dispatch([x[:, :200] for x in xs], ids, ws, 8, "fp8")
    with pytest.raises(ValueError, match="distinct"):
        reference_dispatch(xs, [torch.zeros_like(i) for i in ids], ws, 8)


def test_check_dispatch_output_catches_differences(gen):
    xs, ids, ws = _inputs(gen, (6, 6), 8, 2)
    ref = reference_dispatch(xs, ids, ws, 8, "fp8")[0]
    check_dispatch_output(ref, ref, "fp8")
    moved = reference_dispatch(xs, ids, ws, 8, "fp8")[0]
    tags = read_tags(received_rows(ref, "fp8"))
    other = int(((tags[0] != tags[0][0]) | (tags[1] != tags[1][0])).nonzero()[0])  # a row of another token
    moved.tokens[0], moved.scales[0] = moved.tokens[other].clone(), moved.scales[other].clone()
    with pytest.raises(AssertionError, match="rows differ"):
        check_dispatch_output(moved, ref, "fp8")
    with pytest.raises(AssertionError, match="other \\(rank, index\\)"):
        check_dispatch_output(moved, ref, "fp8", exact=False, fp8_tol=1.0)
    # A GPU-style requantization (multiply by the reciprocal) passes the tolerant check.
    n = int(ref.offsets[-1])
    rows = dequantize_fp8(ref.tokens[:n], ref.scales[:n], "channel128")
    near = reference_dispatch(xs, ids, ws, 8, "fp8")[0]
    near.tokens[:n] = (rows.view(n, -1, 128) * (1 / ref.scales[:n])[..., None]).view(n, -1).to(torch.float8_e4m3fn)
    check_dispatch_output(near, ref, "fp8", exact=False)
