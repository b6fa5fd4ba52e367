"""afdkit.mfa decode and append_kv: CPU fallback, and the CUDA kernels vs the fp64 reference."""

import pytest
import torch

from afdkit import mfa, reference
from afdkit.testing import rel_l2

PAGE = 64


def _case(gen, batch, q_len, heads, kv_heads=1, page=PAGE, lens=None, kv=torch.float8_e4m3fn, per_token=False,
          device="cpu"):
    """Random q and a paged cache whose unused pages (and unused scale rows) hold NaN."""
    lens = lens if lens is not None else [int(x) for x in torch.randint(q_len, 700, (batch,), generator=gen)]
    max_pages = max(1, max((n + page - 1) // page for n in lens))
    num_pages = batch * max_pages + 3
    q = torch.randn(batch, q_len, heads, 256, generator=gen).to(torch.bfloat16)
    k_src = torch.randn(num_pages, page, kv_heads, 256, generator=gen) * 2
    v_src = torch.randn(num_pages, page, kv_heads, 256, generator=gen)
    table = torch.randperm(num_pages, generator=gen)[: batch * max_pages].view(batch, max_pages).to(torch.int32)
    used = torch.zeros(num_pages, dtype=torch.bool)
    for b, n in enumerate(lens):
        used[table[b, : (n + page - 1) // page].long()] = True
    if kv == torch.bfloat16:
        k_cache, v_cache, ks, vs = k_src.to(kv), v_src.to(kv), None, None
    elif per_token:
        ks = torch.rand(num_pages, page, kv_heads, generator=gen) * 0.01 + 0.002
        vs = torch.rand(num_pages, page, kv_heads, generator=gen) * 0.01 + 0.002
        k_cache = (k_src / ks[..., None]).clamp(-448, 448).to(kv)
        v_cache = (v_src / vs[..., None]).clamp(-448, 448).to(kv)
        ks[~used], vs[~used] = float("nan"), float("nan")
    else:
        ks, vs = torch.tensor([0.02]), torch.tensor([0.01])
        k_cache, v_cache = (k_src / ks).clamp(-448, 448).to(kv), (v_src / vs).clamp(-448, 448).to(kv)
    nan_code = torch.tensor(float("nan")).to(kv).view(torch.uint8) if kv != torch.bfloat16 else None
    for c in (k_cache, v_cache):  # NaN in every unused page: a stray read poisons the output
        if kv == torch.bfloat16:
            c[~used] = float("nan")
        else:
            c.view(torch.uint8)[~used] = nan_code
    seq = torch.tensor(lens, dtype=torch.int32)
    args = [q, k_cache, v_cache, table, seq, ks, vs]
    return [None if t is None else t.to(device) for t in args]


def _check(gen, kernel="sm90", **kw):
    q, kc, vc, table, seq, ks, vs = _case(gen, device="cuda", **kw)
    out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    o, lse = mfa.decode(q, kc, vc, table, seq, k_scale=ks, v_scale=vs, out=out, return_lse=True, kernel=kernel)
    torch.cuda.synchronize()
    ref, ref_lse = reference.mfa_decode_reference(q.cpu(), kc.cpu(), vc.cpu(), table.cpu(), seq.cpu(),
                                                  k_scale=None if ks is None else ks.cpu(),
                                                  v_scale=None if vs is None else vs.cpu(), return_lse=True)
    assert not o.isnan().any(), "unwritten or NaN-polluted output"
    assert rel_l2(o.cpu(), ref) < 1e-2  # bf16 out vs fp64 on the same quantized cache
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), finite)
    assert (lse.cpu()[finite].double() - ref_lse[finite].double()).abs().max() < 1e-3
    return o


# ----------------------------------------------------------------------------- CPU
def test_cpu_decode_runs_the_reference(gen):
    q, kc, vc, table, seq, ks, vs = _case(gen, 3, 2, 16, lens=[0, 5, 300])
    out, lse = mfa.decode(q, kc, vc, table, seq, k_scale=ks, v_scale=vs, return_lse=True)
    ref, ref_lse = reference.mfa_decode_reference(q, kc, vc, table, seq, k_scale=ks, v_scale=vs, return_lse=True)
    assert rel_l2(out, ref) < 1e-2 and out.dtype == torch.bfloat16
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isinf(lse[0]).all()
    torch.testing.assert_close(lse, ref_lse.float(), rtol=0, atol=1e-4)


def test_cpu_append_then_decode_round_trip(gen):
    k = torch.randn(5, 1, 256, generator=gen).to(torch.bfloat16)
    v = torch.randn(5, 1, 256, generator=gen).to(torch.bfloat16)
    kc = torch.full((4, PAGE, 1, 256), float("nan")).to(torch.float8_e4m3fn)
    vc = kc.clone()
    ks, vs = torch.full((4, PAGE, 1), float("nan")), torch.full((4, PAGE, 1), float("nan"))
    slots = torch.tensor([130, 131, -1, 132, 133])
    mfa.append_kv(k, v, kc, vc, slots, ks, vs)
    back = kc[2, 2:6, 0].float() * ks[2, 2:6]
    keep = torch.tensor([0, 1, 3, 4])
    assert (back - k[keep, 0].float()).abs().max() <= k.float().abs().max() * 2**-4
    assert kc.view(torch.uint8)[2, 1].eq(0x7F).all()  # slot 129 untouched (skip did not shift)


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["sm90", "simt"])
@pytest.mark.parametrize("q_len", [1, 2, 3, 4])
@pytest.mark.parametrize("heads", [16, 32, 64, 128])
def test_cuda_decode_matches_fp64(gen, kernel, q_len, heads):
    _check(gen, kernel, batch=5, q_len=q_len, heads=heads, lens=[0, 1, q_len, 700, 3000][:5])


@pytest.mark.gpu
@pytest.mark.parametrize("kv, per_token", [(torch.float8_e4m3fn, True), (torch.bfloat16, False)])
@pytest.mark.parametrize("page", [16, 32, 64])
def test_cuda_decode_cache_kinds(gen, kv, per_token, page):
    _check(gen, batch=4, q_len=2, heads=64, kv_heads=2, page=page, kv=kv, per_token=per_token)


@pytest.mark.gpu
@pytest.mark.parametrize("batch, length", [(1, 32768), (8, 9000), (64, 4096)])
def test_cuda_decode_split_kv_long(gen, batch, length):
    _check(gen, batch=batch, q_len=1, heads=64, lens=[length - 37 * i for i in range(batch)])


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay_are_identical(gen):
    q, kc, vc, table, seq, ks, vs = _case(gen, 16, 1, 64, device="cuda")
    plan = mfa.DecodePlan.create(q, kc)
    out = torch.empty_like(q)
    plan.update(seq)
    mfa.decode(q, kc, vc, table, seq, k_scale=ks, v_scale=vs, out=out, plan=plan)
    eager = out.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        plan.update(seq)
        mfa.decode(q, kc, vc, table, seq, k_scale=ks, v_scale=vs, out=out, plan=plan)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    seq.sub_(1)  # a new step with other lengths reuses the captured plan + decode
    graph.replay()
    ref = reference.mfa_decode_reference(q.cpu(), kc.cpu(), vc.cpu(), table.cpu(), seq.cpu(), k_scale=ks.cpu(),
                                         v_scale=vs.cpu())
    assert rel_l2(out.cpu(), ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("per_token", [False, True])
def test_cuda_append_kv_is_bit_exact(gen, per_token):
    tokens, pages = 300, 8
    k = (torch.randn(tokens, 1, 256, generator=gen) * 3).to(torch.bfloat16)
    v = torch.randn(tokens, 1, 256, generator=gen).to(torch.bfloat16)
    slots = torch.randperm(pages * PAGE, generator=gen)[:tokens]
    slots[::7] = -1
    kc = torch.zeros(pages, PAGE, 1, 256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    if per_token:
        scales = [torch.full((pages, PAGE, 1), -1.0) for _ in range(2)]
    else:
        scales = [torch.tensor([0.03]), torch.tensor([0.01])]
    ref_caches = [kc.clone(), kc.clone()]
    ref_scales = [s.clone() for s in scales]
    reference.append_kv_reference(k, v, *ref_caches, slots, *ref_scales)
    gpu = [c.cuda() for c in (kc.clone(), kc.clone())]
    gs = [s.cuda() for s in scales]
    mfa.append_kv(k.cuda(), v.cuda(), *gpu, slots.cuda(), *gs)
    torch.cuda.synchronize()
    for g, r in zip(gpu, ref_caches):
        assert torch.equal(g.cpu().view(torch.uint8), r.view(torch.uint8))
    for g, r in zip(gs, ref_scales):
        assert torch.equal(g.cpu(), r)
