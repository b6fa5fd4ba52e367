"""The mesh dispatcher (and the Dispatcher facade over it), multi-process on loopback.

DeepEP-style exact checks: every rank builds all ranks' inputs from one seed, so each
can compute the single-process reference (``afdkit.dispatch.reference``) and compare its
own output with it: counts and offsets exactly, received rows bit for bit (FP8 codes and
scales, or bf16), the tags the tokens carry (source rank and index in known channels),
and the combine result bit for bit (the same fp32 summation order) and within bf16
rounding of an fp64 weighted sum. Scenarios: random routing with uneven token counts
(zero on one rank), empty experts, every token to one expert, no tokens at all,
back-to-back calls with receive hooks, validation errors, a timeout and a killed peer.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from afdkit.mesh.testing import UCX_ENVS, RankContext, check_all_ok, run_ranks

pytestmark = pytest.mark.multiproc
HIDDEN = 512
MAX_TOKENS = 24
SECRET = b"dispatch-test"


def _connect(ctx: RankContext, timeout_s: float = 20.0, keepalive_s: float = 1.0):
    from afdkit.mesh import Mesh, MeshConfig

    mesh = Mesh(ctx.rank, ctx.world_size, "ffn",
                MeshConfig(mesh_id=ctx.args["mesh_id"], timeout_s=timeout_s, keepalive_s=keepalive_s))
    mesh.connect(ctx.store(), SECRET)
    return mesh


def _inputs(seed: int, tokens: list[int], num_experts: int, top_k: int, experts: list[int] | None = None):
    """All ranks' (x, ids, weights), identical on every rank."""
    from afdkit.dispatch.reference import random_routing, tagged_tokens

    g = torch.Generator().manual_seed(seed)
    xs, ids, ws = [], [], []
    for r, t in enumerate(tokens):
        xs.append(tagged_tokens(r, t, HIDDEN, g))
        i, w = random_routing(t, top_k, num_experts, g, experts=experts)
        ids.append(i)
        ws.append(w)
    return xs, ids, ws


def _experts_apply(out, rank: int, num_local: int, quant: str) -> torch.Tensor:
    """A stand-in for the experts: global expert e scales its rows by (e % 5 + 1) / 4.
    Rows past the dispatch's are poisoned with NaN: combine must not read them."""
    from afdkit.dispatch.reference import received_rows

    rows = received_rows(out, quant)
    expert = torch.repeat_interleave(torch.arange(num_local) + rank * num_local, out.counts.cpu().long())
    y = torch.full((out.capacity, HIDDEN), float("nan"), dtype=torch.bfloat16)
    y[:rows.shape[0]] = (rows * ((expert % 5 + 1).float() / 4)[:, None]).to(torch.bfloat16)
    return y


def _check_one(disp, ctx: RankContext, case: dict, quant: str, seed: int, device: str = "cpu") -> dict:
    """One dispatch + combine of ``case`` on every rank, checked against the reference
    (computed on CPU; ``device`` is where the dispatcher works)."""
    from afdkit.dispatch.reference import (check_dispatch_output, read_tags, received_rows, reference_combine,
                                           reference_dispatch)
    from afdkit.testing import rel_l2

    E, k, r = case["experts"], case["top_k"], ctx.rank
    xs, ids, ws = _inputs(seed, case["tokens"], E, k, case.get("only"))
    refs = reference_dispatch(xs, ids, ws, E, quant, max_tokens_per_rank=MAX_TOKENS)
    impl = getattr(disp, "impl", disp)
    for tokens, scales, counts, offsets in impl._out:  # poison: every value read must be written by this call
        tokens.view(torch.uint8).fill_(0x7F)
        counts.fill_(-1)
        offsets.fill_(-1)
        if scales is not None:
            scales.fill_(float("nan"))
    out = disp.dispatch(xs[r].to(device), ids[r].to(device), ws[r].to(device))
    what = f"rank {r} {quant} {case['name']} on {device}"
    check_dispatch_output(out, refs[r], quant, what=what)
    n = int(out.offsets[-1])
    h, ref_h = out.handle, refs[r].handle
    assert torch.equal(h.src_rank.cpu(), ref_h.src_rank) and torch.equal(h.src_index.cpu(), ref_h.src_index), what
    assert torch.equal(h.weight.cpu(), ref_h.weight), what
    tag_rank, tag_index = read_tags(received_rows(out, quant))
    assert torch.equal(tag_rank, ref_h.src_rank) and torch.equal(tag_index, ref_h.src_index), what
    local = E // ctx.world_size
    combined = disp.combine(_experts_apply(out, r, local, quant).to(device), out).cpu()
    ys = [_experts_apply(refs[d], d, local, quant) for d in range(ctx.world_size)]
    want = reference_combine(ys, refs)[r]
    assert combined.dtype == torch.bfloat16 and combined.shape == (case["tokens"][r], HIDDEN), what
    assert torch.equal(combined, want), f"{what}: combine differs from the reference"
    # Against the exact weighted sum in fp64 (of the rows as received): bf16 rounding only.
    exact = torch.zeros(case["tokens"][r], HIDDEN, dtype=torch.float64)
    for d, ref in enumerate(refs):
        rh = ref.handle
        mine = rh.src_rank == r
        exact.index_add_(0, rh.src_index[mine], ys[d][:rh.num_rows][mine].double() * rh.weight[mine].double()[:, None])
    err = rel_l2(combined, exact) if exact.numel() else 0.0
    assert err < 8e-3, f"{what}: combine vs fp64 rel_l2 {err}"
    return {"rows": n, "counts": out.counts.tolist()}


def _cases(ranks: int) -> list[dict]:
    E = 4 * ranks
    uneven = [MAX_TOKENS, 0, 7][:ranks]
    return [
        {"name": "random", "tokens": uneven, "experts": E, "top_k": 3},
        {"name": "empty_experts", "tokens": [9] * ranks, "experts": E, "top_k": 2, "only": [1, E - 1]},
        {"name": "one_expert", "tokens": [MAX_TOKENS] * ranks, "experts": E, "top_k": 1, "only": [E - 2]},
        {"name": "no_tokens", "tokens": [0] * ranks, "experts": E, "top_k": 3},
        {"name": "top_k_above_local", "tokens": [5, 11, 3][:ranks], "experts": 2 * ranks, "top_k": 2 * ranks},
    ]


def _scenarios(ctx: RankContext) -> dict:
    from afdkit.dispatch import Dispatcher, MeshDispatcher

    mesh = _connect(ctx)
    results: dict = {}
    try:
        for quant in ("fp8", "none"):
            for ci, case in enumerate(_cases(ctx.world_size)):
                name = f"{quant}{ci}"
                if quant == "fp8":  # the facade on one mode, the backend directly on the other
                    disp = Dispatcher(mesh, case["experts"], MAX_TOKENS, HIDDEN, case["top_k"], quant=quant,
                                      name=name)
                    assert disp.backend == "mesh"
                else:
                    disp = MeshDispatcher(mesh, case["experts"], MAX_TOKENS, HIDDEN, case["top_k"], quant, name=name)
                for rep in range(2):  # the same slots reused
                    results[f"{name}.{rep}"] = _check_one(disp, ctx, case, quant, seed=100 * ci + rep)
        results["back_to_back"] = _back_to_back(mesh, ctx)
        results["errors"] = _validation_errors(mesh, ctx)
    finally:
        mesh.close()
    return results


def _back_to_back(mesh, ctx: RankContext) -> list:
    """Two dispatches in flight (receive hooks), combined in the reverse order; a third
    reuses the freed slot. Each result must match its own call's reference."""
    from afdkit.dispatch import MeshDispatcher
    from afdkit.dispatch.reference import check_dispatch_output, reference_combine, reference_dispatch

    E, k, r, R = 4 * ctx.world_size, 3, ctx.rank, ctx.world_size
    disp = MeshDispatcher(mesh, E, MAX_TOKENS, HIDDEN, k, "fp8", name="b2b")
    calls = [_inputs(500 + i, [MAX_TOKENS - i, 3 + i, 10][:R], E, k) for i in range(3)]
    refs = [reference_dispatch(*c, E, "fp8", max_tokens_per_rank=MAX_TOKENS) for c in calls]
    hooks = [disp.dispatch(c[0][r], c[1][r], c[2][r], return_recv_hook=True) for c in calls[:2]]
    outs = [hook() for hook in hooks]
    with pytest.raises(ValueError, match="already called"):
        hooks[0]()
    for i, out in enumerate(outs):
        check_dispatch_output(out, refs[i][r], "fp8", what=f"rank {r} call {i}")
    with pytest.raises(ValueError, match="await their combine"):
        disp.dispatch(calls[2][0][r], calls[2][1][r], calls[2][2][r])
    done = []
    for i in (1, 0):
        ys = [_experts_apply(refs[i][d], d, E // R, "fp8") for d in range(R)]
        got = disp.combine(_experts_apply(outs[i], r, E // R, "fp8"), outs[i].handle, return_recv_hook=True)()
        assert torch.equal(got, reference_combine(ys, refs[i])[r]), f"rank {r} call {i}"
        done.append(i)
    out = disp.dispatch(calls[2][0][r], calls[2][1][r], calls[2][2][r])
    check_dispatch_output(out, refs[2][r], "fp8", what=f"rank {r} call 2")
    ys = [_experts_apply(refs[2][d], d, E // R, "fp8") for d in range(R)]
    assert torch.equal(disp.combine(_experts_apply(out, r, E // R, "fp8"), out), reference_combine(ys, refs[2])[r])
    with pytest.raises(ValueError, match="not be combined yet"):
        disp.combine(_experts_apply(out, r, E // R, "fp8"), out)
    assert disp.pending() == 0
    return done


def _validation_errors(mesh, ctx: RankContext) -> dict:
    """Bad arguments raise before anything moves; the dispatcher still works afterwards."""
    from afdkit.dispatch import Dispatcher, MeshDispatcher

    E, k = 4 * ctx.world_size, 2
    disp = Dispatcher(mesh, E, 8, HIDDEN, k, name="errors")
    g = torch.Generator().manual_seed(9)
    x = torch.randn(6, HIDDEN, generator=g).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(6)]).to(torch.int32)
    w = torch.rand(6, k, generator=g)
    bad = {
        "ids_range": (ValueError, lambda: disp.dispatch(x, ids + E, w)),
        "ids_duplicate": (ValueError, lambda: disp.dispatch(x, ids[:, :1].repeat(1, k), w)),
        "too_many_tokens": (ValueError, lambda: disp.dispatch(torch.cat([x, x]), torch.cat([ids, ids]),
                                                              torch.cat([w, w]))),
        "top_k": (ValueError, lambda: disp.dispatch(x, ids[:, :1], w[:, :1])),
        "x_dtype": (TypeError, lambda: disp.dispatch(x.float(), ids, w)),
        "weights_dtype": (TypeError, lambda: disp.dispatch(x, ids, w.double())),
        "hidden": (ValueError, lambda: disp.dispatch(x[:, :256], ids, w)),
        "device": (ValueError, lambda: disp.dispatch(x.to("meta"), ids.to("meta"), w.to("meta"))),
        "fp8_hidden": (ValueError, lambda: MeshDispatcher(mesh, E, 8, 200, k, "fp8", name="x1")),
        "experts_split": (ValueError, lambda: MeshDispatcher(mesh, E + 1, 8, HIDDEN, k, name="x2")),
        "quant": (ValueError, lambda: MeshDispatcher(mesh, E, 8, HIDDEN, k, "int4", name="x3")),
        "backend": (ValueError, lambda: Dispatcher(mesh, E, 8, HIDDEN, k, backend="ipc")),
        "combine_handle": (ValueError, lambda: disp.combine(torch.zeros(1, HIDDEN, dtype=torch.bfloat16), object())),
    }
    messages = {}
    for name, (exc_type, call) in bad.items():
        with pytest.raises(exc_type) as info:
            call()
        messages[name] = str(info.value)
    out = disp.dispatch(x, ids, w)
    y = torch.zeros(disp.capacity, HIDDEN, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="expert_out"):
        disp.combine(y.float(), out)
    if int(out.offsets[-1]):
        with pytest.raises(ValueError, match="the dispatch produced"):
            disp.combine(y[:int(out.offsets[-1]) - 1], out)
    got = disp.combine(y, out)
    assert torch.equal(got, torch.zeros(6, HIDDEN, dtype=torch.bfloat16))
    return messages


@pytest.mark.timeout(180)
@pytest.mark.parametrize("ranks,transport", [(2, "tcp"), (3, "shm")])
def test_dispatch_combine_match_reference(ranks: int, transport: str) -> None:
    res = check_all_ok(run_ranks(_scenarios, ["ffn"] * ranks, args={"mesh_id": f"disp-{ranks}-{transport}"},
                                 env=UCX_ENVS[transport], timeout_s=150))
    # Every (token, k) pair of every rank lands on exactly one rank: the rows add up.
    assert sum(out["fp80.0"]["rows"] for out in res) == sum([MAX_TOKENS, 0, 7][:ranks]) * 3
    for r, out in enumerate(res):
        assert out["back_to_back"] == [1, 0]
        want = [0] * 4  # only experts 1 (rank 0) and 4 * ranks - 1 (the last rank) are used, by every token
        if r == 0:
            want[1] = 9 * ranks
        if r == ranks - 1:
            want[3] = 9 * ranks
        assert out["fp81.0"]["counts"] == want and out["none1.1"]["counts"] == want, (r, out["fp81.0"])
        msgs = out["errors"]
        assert "expert ids must be in [0, " in msgs["ids_range"]
        assert "exceed max_tokens_per_rank = 8" in msgs["too_many_tokens"]
        assert "built for top_k = 2" in msgs["top_k"]
        assert "hidden % 128 == 0" in msgs["fp8_hidden"]
        assert f"multiple of the number of ranks ({ranks})" in msgs["experts_split"]


def _killed(ctx: RankContext) -> dict:
    """Rank 1 completes one round, then dies; rank 0's next dispatch must raise within
    the timeout, and the dispatcher refuses further calls."""
    from afdkit.dispatch import MeshDispatcher
    from afdkit.mesh import MeshError, MeshPeerLost, MeshTimeout

    timeout_s = ctx.args["timeout_s"]
    mesh = _connect(ctx, timeout_s=timeout_s, keepalive_s=0.5)
    disp = MeshDispatcher(mesh, 8, 8, HIDDEN, 2, "fp8")
    xs, ids, ws = _inputs(3, [8, 8], 8, 2)
    out = disp.dispatch(xs[ctx.rank], ids[ctx.rank], ws[ctx.rank])
    disp.combine(torch.zeros(disp.capacity, HIDDEN, dtype=torch.bfloat16), out)
    if ctx.rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    t0 = time.monotonic()
    try:
        disp.dispatch(xs[0], ids[0], ws[0])
        return {"type": "none"}
    except (MeshPeerLost, MeshTimeout) as exc:
        result = {"type": type(exc).__name__, "msg": str(exc), "after_s": time.monotonic() - t0}
    try:
        disp.dispatch(xs[0], ids[0], ws[0])
    except MeshError as exc:
        result["again"] = str(exc)
    return result


@pytest.mark.timeout(90)
@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_killed_peer_raises(transport: str) -> None:
    timeout_s = 6.0
    res = run_ranks(_killed, ["ffn", "ffn"], args={"timeout_s": timeout_s, "mesh_id": f"kill-{transport}"},
                    env=UCX_ENVS[transport], timeout_s=60)
    assert not res[1].ok and res[1].exitcode == -signal.SIGKILL, res[1]
    assert res[0].ok, res[0].error
    out = res[0].value
    assert out["type"] in ("MeshPeerLost", "MeshTimeout"), out
    assert out["after_s"] < timeout_s + 1.5, out
    assert "rank 1" in out["msg"], out
    assert "failed earlier" in out.get("again", ""), out


def _silent(ctx: RankContext) -> dict:
    """Rank 1 stays alive but never dispatches: rank 0 times out naming it."""
    from afdkit.dispatch import MeshDispatcher
    from afdkit.mesh import MeshTimeout

    mesh = _connect(ctx, timeout_s=20.0)
    disp = MeshDispatcher(mesh, 4, 4, HIDDEN, 1, "none", timeout_s=1.0)
    store = ctx.store()
    result: dict = {}
    if ctx.rank == 0:
        xs, ids, ws = _inputs(4, [4, 4], 4, 1)
        t0 = time.monotonic()
        try:
            disp.dispatch(xs[0], ids[0], ws[0])
        except MeshTimeout as exc:
            result = {"msg": str(exc), "after_s": time.monotonic() - t0}
        store.set("rank0-done", "1")
    else:
        store.wait(["rank0-done"])
    mesh.close()
    return result


@pytest.mark.timeout(60)
def test_silent_peer_times_out() -> None:
    res = check_all_ok(run_ranks(_silent, ["ffn", "ffn"], args={"mesh_id": "silent"}, env=UCX_ENVS["tcp"],
                                 timeout_s=45))
    out = res[0]
    assert out and 0.9 < out["after_s"] < 3.0, out
    assert "dispatch call 1" in out["msg"] and "rank 1" in out["msg"], out


def test_facade_backend_choice() -> None:
    from afdkit.dispatch import Dispatcher, choose_backend

    with pytest.raises(ValueError, match="backend must be one of"):
        choose_backend(None, "nccl")
    with pytest.raises(TypeError, match="must be an afdkit.mesh.Mesh"):
        Dispatcher("not a group", 8, 8, HIDDEN, 2)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs CUDA GPUs"):
            Dispatcher(None, 8, 8, HIDDEN, 2)
    with pytest.raises(ValueError, match="backend 'mesh' takes a connected"):
        choose_backend(None, "mesh")


UCX_CUDA_ENV = {"UCX_TLS": "cuda_ipc,cuda_copy,tcp", "UCX_NET_DEVICES": "lo"}


def _gpu_scenarios(ctx: RankContext) -> dict:
    """The dispatcher on CUDA buffers: the mesh's ipc backend (copy engines) or UCX cuda_ipc."""
    from afdkit.dispatch import MeshDispatcher
    from afdkit.mesh import Mesh, MeshConfig

    dev = f"cuda:{ctx.rank}"
    torch.cuda.set_device(ctx.rank)
    use_ipc = ctx.args["backend"] == "ipc"
    mesh = Mesh(ctx.rank, ctx.world_size, "ffn", MeshConfig(mesh_id=f"disp-gpu-{ctx.args['backend']}", timeout_s=30,
                                                            device=ctx.rank if use_ipc else None))
    mesh.connect(ctx.store(), SECRET)
    results = {}
    try:
        for quant in ("fp8", "none"):
            for ci, case in enumerate(_cases(ctx.world_size)):
                disp = MeshDispatcher(mesh, case["experts"], MAX_TOKENS, HIDDEN, case["top_k"], quant, device=dev,
                                      name=f"{quant}{ci}")
                for rep in range(2):
                    results[f"{quant}{ci}.{rep}"] = _check_one(disp, ctx, case, quant, 100 * ci + rep, dev)
        torch.cuda.synchronize()
        mesh.check()
        results["backend"] = mesh.remote(1 - ctx.rank, "dispatch.fp80.din").backend
    finally:
        mesh.close()
    return results


@pytest.mark.gpu
@pytest.mark.timeout(240)
@pytest.mark.parametrize("backend", ["ipc", "ucx"])
def test_dispatch_combine_on_cuda(backend: str) -> None:
    """2 GPUs of one host: CUDA buffers, stream-ordered puts; the same exact checks."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs of one host")
    res = check_all_ok(run_ranks(_gpu_scenarios, ["ffn", "ffn"], args={"backend": backend},
                                 env=UCX_CUDA_ENV, timeout_s=200))
    assert [r["backend"] for r in res] == [backend] * 2, res
    assert sum(r["fp80.0"]["rows"] for r in res) == MAX_TOKENS * 3


def test_facade_names_a_missing_ipc_backend(monkeypatch) -> None:
    import sys

    from afdkit.dispatch import dispatcher

    monkeypatch.setitem(sys.modules, "afdkit.dispatch.ipc", None)  # as if the module were absent
    with pytest.raises(ImportError, match="CUDA IPC backend .* is not available"):
        dispatcher._ipc_class()
