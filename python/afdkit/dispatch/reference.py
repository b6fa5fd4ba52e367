"""Single-process oracle of expert-parallel dispatch/combine, in plain torch.

It computes what every rank of a dispatcher must receive and return, given all ranks'
inputs at once, following the contract of :mod:`afdkit.dispatch.types`. Both backends'
tests compare against it. It also holds the helpers of DeepEP-style exact tests: tokens
that carry their source rank and index in known channels (:func:`tagged_tokens`,
:func:`read_tags`) and routings with empty experts or a single hot expert
(:func:`random_routing`).

Combine's rounding: each expert-owning rank sums its experts' weighted rows of a token in
fp32 and sends that partial back as one bf16 row (half the bytes of fp32); the source
adds the partials of all ranks in fp32, in rank order, and rounds to bf16. A token whose
experts live on one rank is therefore rounded once, one spread over several ranks once
per partial and once at the end. ``partial_dtype=torch.float32`` gives the sum rounded
once only (the ideal the backends approach within bf16 resolution).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from afdkit.dispatch.types import DispatchOutput
from afdkit.dispatch.validate import FP8_GROUP, receive_capacity, validate_config, validate_dispatch
from afdkit.reference import dequantize_fp8, quantize_fp8

TAG_BLOCKS = 2  # the last two 128-channel blocks of a tagged token: source rank + 1, source index + 1


@dataclass
class ReferenceHandle:
    """Per received row (first ``num_rows`` rows): where it came from and its weight."""

    rank: int
    ranks: int
    tokens_per_rank: list[int]
    src_rank: torch.Tensor     # [num_rows] int64
    src_index: torch.Tensor    # [num_rows] int64: token index on the source rank
    topk_slot: torch.Tensor    # [num_rows] int64: k such that topk_ids[src_index, k] is the row's expert
    weight: torch.Tensor       # [num_rows] fp32: topk_weights[src_index, k]

    @property
    def num_rows(self) -> int:
        return int(self.src_rank.numel())


def _check_inputs(xs: list[torch.Tensor], ids: list[torch.Tensor], weights: list[torch.Tensor], num_experts: int,
                  quant: str, max_tokens: int) -> tuple[int, int]:
    op = "afdkit.dispatch.reference_dispatch"
    if not xs or len(xs) != len(ids) or len(xs) != len(weights):
        raise ValueError(f"{op}: xs, ids and weights must be non-empty lists of one entry per rank, got lengths "
                         f"{len(xs)}, {len(ids)}, {len(weights)}")
    hidden, top_k = xs[0].shape[-1], ids[0].shape[-1]
    validate_config(op, num_experts, len(xs), max_tokens, hidden, top_k, quant)
    for r, (x, i, w) in enumerate(zip(xs, ids, weights)):
        validate_dispatch(f"{op} (rank {r})", x, i, w, num_experts, max_tokens, hidden, quant, True)
        if i.shape[1] != top_k:
            raise ValueError(f"{op}: every rank must use top_k = {top_k}, rank {r} has {i.shape[1]}")
    return hidden, top_k


def reference_dispatch(xs: list[torch.Tensor], ids: list[torch.Tensor], weights: list[torch.Tensor],
                       num_experts: int, quant: str = "fp8", *,
                       max_tokens_per_rank: int | None = None) -> list[DispatchOutput]:
    """What each rank receives from dispatch, given every rank's ``(x, topk_ids, topk_weights)``.

    Returns one :class:`DispatchOutput` per rank (on CPU) whose handle is a
    :class:`ReferenceHandle`. Rows: expert-major over the rank's local experts, within an
    expert by (source rank, source index); FP8 rows are quantized per row and 128
    channels exactly as :func:`afdkit.reference.quantize_fp8` (``"channel128"``) does.
    Buffers have the fixed capacity ``ranks * max_tokens_per_rank * min(top_k,
    experts_per_rank)`` (``max_tokens_per_rank`` defaults to the largest ``T``); unused
    rows are zero.
    """
    ranks = len(xs)
    max_tokens = max_tokens_per_rank or max(1, max(x.shape[0] for x in xs))
    hidden, top_k = _check_inputs(xs, ids, weights, num_experts, quant, max_tokens)
    local = num_experts // ranks
    capacity = receive_capacity(ranks, max_tokens, top_k, local)
    # Every (rank, token, k) triple, sorted by (expert, source rank, source index).
    src_rank = torch.cat([torch.full((i.numel(),), r, dtype=torch.int64) for r, i in enumerate(ids)])
    src_index = torch.cat([torch.arange(i.shape[0]).repeat_interleave(top_k) for i in ids])
    slot = torch.cat([torch.arange(top_k).repeat(i.shape[0]) for i in ids])
    expert = torch.cat([i.detach().cpu().reshape(-1).long() for i in ids])
    weight = torch.cat([w.detach().cpu().reshape(-1).float() for w in weights])
    rows_x = torch.cat([x.detach().cpu() for x in xs])  # [sum T, hidden]
    offsets_of_rank = torch.tensor([0] + [x.shape[0] for x in xs]).cumsum(0)
    key = (expert * ranks + src_rank) * (max_tokens + 1) + src_index
    order = torch.argsort(key, stable=True)
    outs = []
    for r in range(ranks):
        mine = order[(expert[order] >= r * local) & (expert[order] < (r + 1) * local)]
        n = int(mine.numel())
        counts = torch.bincount(expert[mine] - r * local, minlength=local).to(torch.int32)
        offsets = torch.zeros(local + 1, dtype=torch.int32)
        offsets[1:] = counts.cumsum(0)
        src = rows_x[offsets_of_rank[src_rank[mine]] + src_index[mine]]
        if quant == "fp8":
            tokens = torch.zeros(capacity, hidden, dtype=torch.float8_e4m3fn)
            scales = torch.zeros(capacity, hidden // FP8_GROUP, dtype=torch.float32)
            if n:
                tokens[:n], scales[:n] = quantize_fp8(src, "channel128")
        else:
            tokens, scales = torch.zeros(capacity, hidden, dtype=torch.bfloat16), None
            tokens[:n] = src
        handle = ReferenceHandle(r, ranks, [x.shape[0] for x in xs], src_rank[mine], src_index[mine], slot[mine],
                                 weight[mine])
        outs.append(DispatchOutput(tokens, scales, counts, offsets, handle))
    return outs


def reference_combine(expert_outs: list[torch.Tensor], outputs: list[DispatchOutput], *,
                      partial_dtype: torch.dtype = torch.bfloat16) -> list[torch.Tensor]:
    """What each rank gets back from combine: ``[T_r, hidden]`` bf16 per source rank.

    ``expert_outs[d]`` holds rank ``d``'s expert results in the row order of
    ``outputs[d]`` (at least its ``num_rows`` rows). Rank ``d`` sums ``weight * row`` per
    source token in fp32 (rows in their order), rounds that partial to
    ``partial_dtype``; the source adds the partials in fp32 by ascending ``d`` and
    rounds to bf16.
    """
    handles = [o.handle for o in outputs]
    if len(expert_outs) != len(outputs) or not all(isinstance(h, ReferenceHandle) for h in handles):
        raise ValueError("afdkit.dispatch.reference_combine: give one expert output per rank and the outputs "
                         "of reference_dispatch")
    ranks, tokens_per_rank = handles[0].ranks, handles[0].tokens_per_rank
    hidden = expert_outs[0].shape[-1]
    totals = [torch.zeros(t, hidden, dtype=torch.float32) for t in tokens_per_rank]
    for d, (y, h) in enumerate(zip(expert_outs, handles)):
        if y.shape[0] < h.num_rows:
            raise ValueError(f"afdkit.dispatch.reference_combine: rank {d} has {h.num_rows} rows but its expert "
                             f"output only {y.shape[0]}")
        partials = [torch.zeros(t, hidden, dtype=torch.float32) for t in tokens_per_rank]
        weighted = y[:h.num_rows].detach().cpu().float() * h.weight[:, None]
        for row in range(h.num_rows):  # in row order: the fp32 summation order of a backend
            partials[int(h.src_rank[row])][int(h.src_index[row])] += weighted[row]
        for s in range(ranks):
            totals[s] += partials[s].to(partial_dtype).float()
    return [t.to(torch.bfloat16) for t in totals]


def received_rows(out: DispatchOutput, quant: str) -> torch.Tensor:
    """The used rows of a dispatch output as fp32 (dequantized when FP8), on CPU."""
    n = int(out.offsets[-1])
    if quant == "fp8":
        return dequantize_fp8(out.tokens[:n].cpu(), out.scales[:n].cpu(), "channel128")
    return out.tokens[:n].cpu().float()


def tagged_tokens(rank: int, tokens: int, hidden: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random bf16 tokens whose last two 128-channel blocks are constant: ``rank + 1`` and
    ``index + 1``. A constant block survives FP8 (one scale per block) within rounding,
    so :func:`read_tags` recovers each received row's origin exactly, FP8 or not."""
    if hidden < FP8_GROUP * (TAG_BLOCKS + 1) or hidden % FP8_GROUP:
        raise ValueError(f"tagged_tokens: hidden must be a multiple of {FP8_GROUP} and >= "
                         f"{FP8_GROUP * (TAG_BLOCKS + 1)}, got {hidden}")
    if tokens > 255:
        raise ValueError("tagged_tokens: at most 255 tokens (bf16 holds integers up to 256 exactly)")
    x = torch.randn(tokens, hidden, generator=generator)
    x[:, -2 * FP8_GROUP:-FP8_GROUP] = rank + 1
    x[:, -FP8_GROUP:] = (torch.arange(tokens, dtype=torch.float32) + 1)[:, None]
    return x.to(torch.bfloat16)


def read_tags(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(source rank, source index)`` of rows made by :func:`tagged_tokens` (fp32 rows,
    e.g. from :func:`received_rows`): the rounded means of the two tag blocks, minus one."""
    rank = rows[:, -2 * FP8_GROUP:-FP8_GROUP].float().mean(1).round().long() - 1
    index = rows[:, -FP8_GROUP:].float().mean(1).round().long() - 1
    return rank, index


def random_routing(tokens: int, top_k: int, num_experts: int, generator: torch.Generator | None = None, *,
                   experts: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct random top-k ids per token (int32), drawn from ``experts`` (default: all),
    and random positive fp32 weights. ``experts`` with fewer ids than the others leaves
    experts empty; ``experts=[e]`` with ``top_k=1`` sends every token to one expert."""
    pool = torch.tensor(experts if experts is not None else list(range(num_experts)), dtype=torch.int64)
    if pool.numel() < top_k:
        raise ValueError(f"random_routing: need at least top_k = {top_k} experts to draw from, got {pool.tolist()}")
    picks = torch.rand(tokens, pool.numel(), generator=generator).argsort(dim=1)[:, :top_k]
    ids = pool[picks].to(torch.int32)
    weights = torch.rand(tokens, top_k, generator=generator) * 0.9 + 0.1
    return ids, weights


def check_dispatch_output(got: DispatchOutput, ref: DispatchOutput, quant: str, *, exact: bool = True,
                          fp8_tol: float = 1e-4, what: str = "dispatch") -> None:
    """Raises AssertionError unless ``got`` carries the same rows as the reference ``ref``.

    Counts and offsets must match exactly; the used rows too when ``exact`` (bf16 values,
    or FP8 codes and scales bit for bit: a backend quantizing with the reference's
    formula), else FP8 rows within ``calc_diff < fp8_tol`` after dequantization (a GPU
    kernel may round a few values differently) and their tags exactly when the tokens
    were made by :func:`tagged_tokens` (``read_tags`` on both sides agrees).
    """
    from afdkit.testing import calc_diff

    counts, offsets = got.counts.cpu(), got.offsets.cpu()
    if not torch.equal(counts.long(), ref.counts.long()):
        raise AssertionError(f"{what}: counts per local expert {counts.tolist()} != reference {ref.counts.tolist()}")
    if not torch.equal(offsets.long(), ref.offsets.long()):
        raise AssertionError(f"{what}: offsets {offsets.tolist()} != reference {ref.offsets.tolist()}")
    if got.tokens.shape[0] < ref.capacity or got.tokens.shape[1:] != ref.tokens.shape[1:]:
        raise AssertionError(f"{what}: tokens {list(got.tokens.shape)} cannot hold the reference's "
                             f"{list(ref.tokens.shape)}")
    n = int(ref.offsets[-1])
    if quant == "none" or exact:
        same = torch.equal(got.tokens[:n].cpu().view(torch.uint8), ref.tokens[:n].view(torch.uint8))
        if quant == "fp8":
            same = same and torch.equal(got.scales[:n].cpu(), ref.scales[:n])
        if not same:
            a, b = received_rows(got, quant), received_rows(ref, quant)
            bad = (a != b).any(dim=1).nonzero().flatten().tolist()
            raise AssertionError(f"{what}: {len(bad)} of {n} rows differ from the reference, first rows {bad[:8]}")
        return
    a, b = received_rows(got, quant), received_rows(ref, quant)
    diff = calc_diff(a, b) if n else 0.0
    if not diff < fp8_tol:
        raise AssertionError(f"{what}: FP8 rows differ from the reference: calc_diff {diff:.3g} >= {fp8_tol}")
    if a.shape[1] >= FP8_GROUP * (TAG_BLOCKS + 1):
        ga, gb = read_tags(a), read_tags(b)
        if not (torch.equal(ga[0], gb[0]) and torch.equal(ga[1], gb[1])):
            raise AssertionError(f"{what}: rows come from other (rank, index) than the reference's")


__all__ = ["reference_dispatch", "reference_combine", "ReferenceHandle", "received_rows", "tagged_tokens",
           "read_tags", "random_routing", "check_dispatch_output"]
