"""Single-device MoE ops: route, permute, unpermute (CPU path, and CUDA vs CPU)."""

import pytest
import torch

from afdkit import moe


def _logits(tokens, experts, gen, dtype=torch.float32):
    return (torch.randn(tokens, experts, generator=gen) * 2).to(dtype)


def _tagged_tokens(tokens, hidden, gen):
    """Token t carries t in channel 0 and random data elsewhere: rows are traceable."""
    x = torch.randn(tokens, hidden, generator=gen)
    x[:, 0] = torch.arange(tokens, dtype=torch.float32)
    return x.to(torch.bfloat16)


def test_route_softmax_topk_matches_sort(gen):
    logits = _logits(64, 48, gen)
    w, ids = moe.route(logits, 3)
    probs = torch.softmax(logits.double(), -1)
    top = probs.sort(-1, descending=True)
    assert torch.equal(ids.long(), top.indices[:, :3])
    torch.testing.assert_close(w.double(), top.values[:, :3], rtol=1e-6, atol=1e-7)
    assert (w.sum(-1) < 1).all()  # Step-3: not renormalised


def test_route_options(gen):
    logits = _logits(16, 8, gen)
    w, ids = moe.route(logits, 2, scoring="sigmoid", renormalize=True)
    s = torch.sigmoid(logits.double()).gather(1, ids.long())
    torch.testing.assert_close(w.double(), s / s.sum(-1, keepdim=True), rtol=1e-6, atol=1e-7)


def test_route_refusals(gen):
    with pytest.raises(ValueError, match=r"top_k must be in 1..min\(num_experts, 16\) = 8, got 9"):
        moe.route(_logits(4, 8, gen), 9)
    with pytest.raises(ValueError, match="scoring must be 'softmax' or 'sigmoid'"):
        moe.route(_logits(4, 8, gen), 2, scoring="relu")
    with pytest.raises(TypeError, match="router_logits"):
        moe.route(_logits(4, 8, gen).to(torch.int32), 2)


@pytest.mark.parametrize("quant", ["fp8", "none"])
def test_permute_groups_by_expert_and_inverse_points_back(gen, quant):
    tokens, hidden, experts, k = 50, 256, 12, 3
    x = _tagged_tokens(tokens, hidden, gen)
    _, ids = moe.route(_logits(tokens, experts, gen), k)
    ids[0] = torch.tensor([5, 6, 7])  # ensure not all experts are hit identically
    ids[1:4, 0] = 11
    p = moe.permute(x, ids, experts, quant=quant)
    assert torch.equal(p.expert_counts.long(), torch.bincount(ids.flatten().long(), minlength=experts))
    assert p.expert_offsets[0] == 0 and p.expert_offsets[-1] == tokens * k
    rows = p.x.float() * (p.scales.repeat_interleave(128, -1) if quant == "fp8" else 1)
    for t in range(tokens):
        for j in range(k):
            r = int(p.inverse[t, j])
            e = int(ids[t, j])
            assert p.expert_offsets[e] <= r < p.expert_offsets[e + 1]
            assert abs(rows[r, 0].item() - t) <= t * 2**-4 + 1e-6


def test_permute_edge_cases(gen):
    x = _tagged_tokens(6, 128, gen)
    ids = torch.zeros(6, 2, dtype=torch.int32)  # all copies to expert 0; others empty
    ids[:, 1] = 3
    p = moe.permute(x, ids, 4)
    assert p.expert_counts.tolist() == [6, 0, 0, 6]
    assert p.expert_offsets.tolist() == [0, 6, 6, 6, 12]
    empty = moe.permute(x[:0], ids[:0], 4)
    assert empty.x.shape == (0, 128) and empty.expert_counts.tolist() == [0, 0, 0, 0]


def test_permute_refusals(gen):
    x = _tagged_tokens(4, 100, gen)
    ids = torch.zeros(4, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"FP8 needs hidden % 128 == 0"):
        moe.permute(x, ids, 4)
    with pytest.raises(ValueError, match=r"expert ids must be in \[0, 4\), got values in \[0, 4\]"):
        moe.permute(_tagged_tokens(4, 128, gen), ids + torch.tensor([[0, 4]], dtype=torch.int32), 4)
    with pytest.raises(ValueError, match=r"argument 'topk_ids' must have size 4 in dimension 0"):
        moe.permute(_tagged_tokens(4, 128, gen), ids[:3], 4)


def test_unpermute_is_the_weighted_sum(gen):
    tokens, hidden, experts, k = 40, 128, 8, 3
    x = _tagged_tokens(tokens, hidden, gen)
    w, ids = moe.route(_logits(tokens, experts, gen), k)
    p = moe.permute(x, ids, experts, quant="none")
    scale = torch.rand(experts, generator=gen) + 0.5  # a per-expert "FFN": y = scale[e] * x
    expert_of_row = torch.repeat_interleave(torch.arange(experts), p.expert_counts.long())
    y = (p.x.float() * scale[expert_of_row, None]).to(torch.bfloat16)
    out = moe.unpermute(y, p, w)
    expected = sum(w[:, j, None].double() * scale[ids[:, j].long(), None].double() * x.double() for j in range(k))
    assert (out.double() - expected).norm() / expected.norm() < 1e-2


# ---------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [0, 1, 128, 512])
def test_cuda_route_matches_cpu(gen, tokens):
    logits = _logits(tokens, 48, gen, torch.bfloat16)
    w, ids = moe.route(logits.cuda(), 3)
    w_ref, ids_ref = moe.route(logits, 3)
    assert torch.equal(ids.cpu(), ids_ref)
    torch.testing.assert_close(w.cpu(), w_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 128, 512])
def test_cuda_permute_unpermute_match_cpu(gen, tokens):
    hidden, experts, k = 7168, 48, 3
    x = _tagged_tokens(tokens, hidden, gen)
    w, ids = moe.route(_logits(tokens, experts, gen), k)
    p_gpu = moe.permute(x.cuda(), ids.cuda(), experts)
    p_cpu = moe.permute(x, ids, experts)
    assert torch.equal(p_gpu.expert_counts.cpu(), p_cpu.expert_counts)
    assert torch.equal(p_gpu.expert_offsets.cpu(), p_cpu.expert_offsets)
    # Row order inside an expert may differ; compare through each side's inverse map.
    for name in ("x", "scales"):
        g = getattr(p_gpu, name).cpu()
        c = getattr(p_cpu, name)
        g_rows = g[p_gpu.inverse.cpu().long().flatten()]
        c_rows = c[p_cpu.inverse.long().flatten()]
        assert torch.equal(g_rows.view(torch.uint8) if name == "x" else g_rows,
                           c_rows.view(torch.uint8) if name == "x" else c_rows)
    y = torch.randn(tokens * k, hidden, generator=gen).to(torch.bfloat16)
    y_gpu = y.cuda()[p_gpu.inverse.flatten().argsort()]  # same content per (t, k) on both sides
    y_cpu = y[p_cpu.inverse.flatten().long().argsort()]
    out_gpu = moe.unpermute(y_gpu, p_gpu, w.cuda()).cpu()
    out_cpu = moe.unpermute(y_cpu, p_cpu, w)
    assert (out_gpu.double() - out_cpu.double()).norm() / out_cpu.double().norm() < 1e-2


@pytest.mark.gpu
def test_cuda_permute_is_graph_capturable(gen):
    x = _tagged_tokens(128, 7168, gen).cuda()
    _, ids = moe.route(_logits(128, 48, gen).cuda(), 3)
    moe.permute(x, ids, 48)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        p = moe.permute(x, ids, 48)
    _, new_ids = moe.route(_logits(128, 48, gen).cuda(), 3)
    ids.copy_(new_ids)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(p.expert_counts.cpu().long(), torch.bincount(ids.cpu().flatten().long(), minlength=48))
