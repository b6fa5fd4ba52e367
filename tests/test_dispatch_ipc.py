"""The CUDA IPC dispatcher (afdkit.dispatch.ipc): layout and errors on CPU, and DeepEP-style
exact tests on 2 and 4 GPUs of one host.

GPU tests: one process per GPU (``run_ranks``, spawn), an NCCL group over the parent's
TCPStore, rank r on cuda:r. Every rank builds all ranks' inputs from one seed and
computes the single-process reference (``afdkit.dispatch.reference``), then compares its
own output: counts and offsets exactly, received rows bit for bit (FP8 codes and scales,
or bf16), the tags the tokens carry, the per-row records of the handle, and the combine
result bit for bit against ``reference_combine`` (same fp32 summation order: rows of a
token by ascending local expert, partials by ascending rank) and within bf16 rounding of
an fp64 weighted sum (rel_l2 < 8e-3, as the mesh backend's tests). Outputs are poisoned
(0xFF / NaN / -1) before each call, so every value checked was written by that call.
"""

from __future__ import annotations

import datetime
import time

import pytest
import torch

from afdkit.mesh.testing import RankContext, check_all_ok, run_ranks

HIDDEN = 512
MAX_TOKENS = 24
GPU_TIMEOUT_S = 30.0  # the dispatcher's bounded waits in the GPU tests

# ---- CPU: layout, import, errors ---------------------------------------------------------------


@pytest.mark.parametrize("ranks,tokens,hidden,top_k,quant,depth", [
    (4, 128, 7168, 3, "fp8", 1), (2, 24, 512, 8, "fp8", 2), (3, 5, 200, 2, "none", 2), (8, 512, 7168, 8, "fp8", 3),
    (1, 1, 128, 1, "none", 1), (5, 7, 13, 16, "none", 2),
])
def test_layout_offsets_are_aligned_and_disjoint(ranks, tokens, hidden, top_k, quant, depth) -> None:
    from afdkit.dispatch.ipc import ipc_layout

    lay = ipc_layout(ranks, tokens, hidden, top_k, quant, depth)
    fp8 = quant == "fp8"
    # A dispatch row: codes (or bf16) | scales | ids + weights, each section 16-byte aligned.
    assert lay.token_bytes >= (hidden if fp8 else 2 * hidden) and lay.token_bytes % 16 == 0
    assert lay.scale_offset == lay.token_bytes
    assert lay.meta_offset - lay.scale_offset >= (4 * (hidden // 128) if fp8 else 0)
    assert lay.row_bytes >= lay.meta_offset + 8 * top_k
    assert lay.combine_row_bytes >= 2 * hidden
    for v in (lay.scale_offset, lay.meta_offset, lay.row_bytes, lay.combine_row_bytes, lay.recv_offset,
              lay.combine_offset, lay.slot_bytes):
        assert v % 16 == 0, lay
    for v in (lay.dispatch_flags_offset, lay.combine_flags_offset, lay.recv_offset, lay.combine_offset):
        assert v % 128 == 0, lay
    # Regions of a slot, in order and disjoint: flags, flags, receive area, combine area.
    regions = [(lay.dispatch_flags_offset, 8 * ranks), (lay.combine_flags_offset, 8 * ranks),
               (lay.recv_offset, ranks * tokens * lay.row_bytes),
               (lay.combine_offset, ranks * tokens * lay.combine_row_bytes)]
    for (a, na), (b, _) in zip(regions, regions[1:]):
        assert a + na <= b, (regions, lay)
    assert regions[-1][0] + regions[-1][1] <= lay.slot_bytes
    assert lay.total_bytes == depth * lay.slot_bytes
    # Row addresses: the last row of the last slot ends inside the buffer.
    last = lay.recv_row_offset(depth - 1, ranks - 1, tokens - 1) + lay.row_bytes
    assert last <= lay.combine_row_offset(depth - 1, 0, 0) <= lay.total_bytes
    assert lay.combine_row_offset(depth - 1, ranks - 1, tokens - 1) + lay.combine_row_bytes <= lay.total_bytes
    assert lay.recv_row_offset(0, 1 % ranks, 0) == lay.recv_offset + (1 % ranks) * tokens * lay.row_bytes
    native = lay.native()
    assert "quant" not in native and native["row_bytes"] == lay.row_bytes and native["total_bytes"] == lay.total_bytes


def test_layout_size_of_the_step3_case() -> None:
    """4 ranks x 128 tokens x 7168, FP8, top-3: ~11 MB a slot (rows of 7168 + 224 + 32 bytes)."""
    from afdkit.dispatch.ipc import ipc_layout

    lay = ipc_layout(4, 128, 7168, 3, "fp8")
    assert lay.row_bytes == 7168 + 224 + 32
    assert lay.combine_row_bytes == 14336
    assert 11.0e6 < lay.slot_bytes < 11.3e6
    assert ipc_layout(4, 128, 7168, 3, "fp8", depth=2).total_bytes == 2 * lay.slot_bytes


def test_layout_rejects_bad_arguments() -> None:
    from afdkit.dispatch.ipc import ipc_layout, recv_shared_bytes

    with pytest.raises(ValueError, match="hidden % 128"):
        ipc_layout(2, 8, 200, 2, "fp8")
    with pytest.raises(ValueError, match="quant must be one of"):
        ipc_layout(2, 8, 256, 2, "int4")
    with pytest.raises(ValueError, match="'depth' must be an int >= 1"):
        ipc_layout(2, 8, 256, 2, "fp8", depth=0)
    with pytest.raises(ValueError, match="'ranks' must be an int >= 1"):
        ipc_layout(True, 8, 256, 2, "fp8")
    # The receive kernel's shared memory: 2 words per (local expert, 32 received tokens) + offsets.
    assert recv_shared_bytes(4, 128, 12) == (2 * 12 * 16 + 13) * 4


def test_import_exports_and_error_words() -> None:
    import afdkit.dispatch as d
    from afdkit.dispatch import ipc

    assert d.IpcDispatcher is ipc.IpcDispatcher and d.ipc_layout is ipc.ipc_layout
    assert issubclass(ipc.IpcTimeout, TimeoutError) and issubclass(ipc.IpcTimeout, ipc.IpcError)
    word = 1 << 56 | 1 << 48 | 3 << 32
    exc = ipc.decode_error(word, 0, 2.5)
    assert isinstance(exc, ipc.IpcTimeout) and "rank 3's dispatch" in str(exc) and "2.5 s" in str(exc)
    assert "rank 2's combine" in str(ipc.decode_error(2 << 56 | 2 << 32, 1, 1.0))
    bad = ipc.decode_error(3 << 56 | 0xFFFFFFFF, 0, 1.0, num_experts=8)
    assert not isinstance(bad, TimeoutError) and "expert id -1, outside [0, 8)" in str(bad)
    assert "fewer rows than the dispatch produced" in str(ipc.decode_error(5 << 56 | 17, 0, 1.0))


def test_dispatcher_without_cuda_explains(monkeypatch) -> None:
    from afdkit.dispatch import Dispatcher, IpcDispatcher

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="needs CUDA GPUs"):
        Dispatcher(None, 8, 8, HIDDEN, 2)
    with pytest.raises(ValueError, match="needs CUDA GPUs"):
        Dispatcher(None, 8, 8, HIDDEN, 2, backend="ipc")
    with pytest.raises(ValueError, match="CUDA IPC backend needs CUDA GPUs"):
        IpcDispatcher(None, 8, 8, HIDDEN, 2)


def test_dispatcher_without_process_group_explains() -> None:
    from afdkit.dispatch import IpcDispatcher

    if not torch.cuda.is_available():
        pytest.skip("the group check comes after the CUDA check")
    if torch.distributed.is_initialized():
        pytest.skip("a process group exists in this process")
    with pytest.raises(ValueError, match="initialize torch.distributed first"):
        IpcDispatcher(None, 8, 8, HIDDEN, 2)


# ---- GPU: helpers --------------------------------------------------------------------------------


def _init(ctx: RankContext) -> None:
    import torch.distributed as dist

    torch.cuda.set_device(ctx.rank)
    dist.init_process_group("nccl", store=ctx.store(), rank=ctx.rank, world_size=ctx.world_size,
                            timeout=datetime.timedelta(seconds=60), device_id=torch.device("cuda", ctx.rank))


def _done() -> None:
    import torch.distributed as dist

    torch.cuda.synchronize()
    dist.barrier()
    dist.destroy_process_group()


def _inputs(seed: int, tokens: list[int], num_experts: int, top_k: int, experts: list[int] | None = None,
            hidden: int = HIDDEN):
    """All ranks' (x, ids, weights) on CPU, identical on every rank."""
    from afdkit.dispatch.reference import random_routing, tagged_tokens

    g = torch.Generator().manual_seed(seed)
    xs, ids, ws = [], [], []
    for r, t in enumerate(tokens):
        xs.append(tagged_tokens(r, t, hidden, g))
        i, w = random_routing(t, top_k, num_experts, g, experts=experts)
        ids.append(i)
        ws.append(w)
    return xs, ids, ws


def _experts(out, rank: int, num_local: int, quant: str) -> torch.Tensor:
    """A stand-in for the experts that runs on either device without a host sync (so it
    can be captured): row of global expert e times (e % 5 + 1) / 4, in fp32, to bf16.
    Rows past the dispatch's hold poison; combine must not read them."""
    rows = out.tokens.float()
    if quant == "fp8":
        rows = (rows.view(rows.shape[0], -1, 128) * out.scales.float()[:, :, None]).view(rows.shape)
    cap = rows.shape[0]
    idx = torch.arange(cap, dtype=torch.int32, device=rows.device)
    e = torch.searchsorted(out.offsets[1:].to(rows.device).contiguous(), idx, right=True)
    factor = ((e + rank * num_local) % 5 + 1).float() / 4
    return (rows * factor[:, None]).to(torch.bfloat16)


def _poison(disp) -> None:
    for buf in disp.impl.buffers if hasattr(disp, "impl") else disp.buffers:
        buf["tokens"].view(torch.uint8).fill_(0xFF)  # NaN in e4m3fn, a NaN pattern in bf16
        if buf["scales"] is not None:
            buf["scales"].fill_(float("nan"))
        for key in ("counts", "offsets", "row_src", "row_index"):
            buf[key].fill_(-1)
        buf["row_weight"].fill_(float("nan"))


def _poisoned_alloc(tokens: int, hidden: int) -> None:
    """Leaves a NaN block of combine's output size in the caching allocator: the next
    allocation of that size (combine's output) most likely reuses it."""
    t = torch.full((tokens, hidden), float("nan"), dtype=torch.bfloat16, device="cuda")
    del t


def _expected_combine(refs, rank: int, num_local: int, quant: str) -> torch.Tensor:
    from afdkit.dispatch.reference import reference_combine

    ys = [_experts(refs[d], d, num_local, quant) for d in range(len(refs))]
    return reference_combine(ys, refs)[rank], ys


def _check_combine(got: torch.Tensor, refs, ys, rank: int, what: str) -> None:
    from afdkit.dispatch.reference import reference_combine
    from afdkit.testing import rel_l2

    want = reference_combine(ys, refs)[rank]
    got = got.cpu()
    assert got.dtype == torch.bfloat16 and got.shape == want.shape, what
    assert torch.equal(got, want), f"{what}: combine differs from the reference"
    exact = torch.zeros(want.shape, dtype=torch.float64)
    for d, ref in enumerate(refs):
        h = ref.handle
        mine = h.src_rank == rank
        exact.index_add_(0, h.src_index[mine], ys[d][:h.num_rows][mine].double() * h.weight[mine].double()[:, None])
    err = rel_l2(got, exact) if exact.numel() else 0.0
    assert err < 8e-3, f"{what}: combine vs fp64 rel_l2 {err}"


def _check_one(disp, ctx: RankContext, case: dict, quant: str, seed: int, hidden: int = HIDDEN) -> int:
    """One dispatch + combine of ``case`` on every rank, checked against the reference."""
    from afdkit.dispatch.reference import check_dispatch_output, read_tags, received_rows, reference_dispatch

    E, k, r, dev = case["experts"], case["top_k"], ctx.rank, f"cuda:{ctx.rank}"
    xs, ids, ws = _inputs(seed, case["tokens"], E, k, case.get("only"), hidden)
    refs = reference_dispatch(xs, ids, ws, E, quant, max_tokens_per_rank=case.get("max_tokens", MAX_TOKENS))
    _poison(disp)
    ids_r = ids[r].to(dev) if seed % 2 else ids[r].to(dev, torch.int64)  # both id dtypes
    out = disp.dispatch(xs[r].to(dev), ids_r, ws[r].to(dev))
    what = f"rank {r} {quant} {case['name']} seed {seed}"
    check_dispatch_output(out, refs[r], quant, what=what)
    h, ref_h = out.handle, refs[r].handle
    assert torch.equal(h.src_rank.cpu(), ref_h.src_rank) and torch.equal(h.src_index.cpu(), ref_h.src_index), what
    assert torch.equal(h.weight.cpu(), ref_h.weight), what
    tag_rank, tag_index = read_tags(received_rows(out, quant))
    assert torch.equal(tag_rank, ref_h.src_rank) and torch.equal(tag_index, ref_h.src_index), what
    local = E // ctx.world_size
    _, ys = _expected_combine(refs, r, local, quant)
    _poisoned_alloc(case["tokens"][r], hidden)
    got = disp.combine(_experts(out, r, local, quant), out)
    _check_combine(got, refs, ys, r, what)
    return int(out.offsets[-1])


def _cases(ranks: int) -> list[dict]:
    E = 4 * ranks
    uneven = [MAX_TOKENS, 0, 7, 13][:ranks]
    return [
        {"name": "random", "tokens": uneven, "experts": E, "top_k": 3},
        {"name": "empty_experts", "tokens": [9] * ranks, "experts": E, "top_k": 2, "only": [1, E - 1]},
        {"name": "one_expert", "tokens": [MAX_TOKENS] * ranks, "experts": E, "top_k": 1, "only": [E - 2]},
        {"name": "no_tokens", "tokens": [0] * ranks, "experts": E, "top_k": 3},
        {"name": "full", "tokens": [MAX_TOKENS] * ranks, "experts": E, "top_k": 4},
        {"name": "top_k_above_local", "tokens": [5, 11, 3, 0][:ranks], "experts": 2 * ranks, "top_k": 2 * ranks},
    ]


# ---- GPU: scenarios ------------------------------------------------------------------------------


def _scenarios(ctx: RankContext) -> dict:
    from afdkit.dispatch import Dispatcher, IpcDispatcher

    _init(ctx)
    results: dict = {}
    for quant in ("fp8", "none"):
        for ci, case in enumerate(_cases(ctx.world_size)):
            args = (case["experts"], MAX_TOKENS, HIDDEN, case["top_k"])
            if quant == "fp8":  # the facade on one mode, the backend directly on the other
                disp = Dispatcher(None, *args, quant=quant, timeout_s=GPU_TIMEOUT_S)
                assert disp.backend == "ipc"
            else:
                disp = IpcDispatcher(None, *args, quant, timeout_s=GPU_TIMEOUT_S)
            for rep in range(3):  # the slots reused
                results[f"{quant}.{case['name']}.{rep}"] = _check_one(disp, ctx, case, quant, 100 * ci + rep)
            impl = getattr(disp, "impl", disp)
            impl.check()
            impl.close()
    # Step-3 sizes: hidden 7168, 48 experts, top-3, T = max_tokens on every rank.
    big = {"name": "step3", "tokens": [128] * ctx.world_size, "experts": 48, "top_k": 3, "max_tokens": 128}
    with IpcDispatcher(None, 48, 128, 7168, 3, "fp8", timeout_s=GPU_TIMEOUT_S) as disp:
        results["step3"] = _check_one(disp, ctx, big, "fp8", 7, hidden=7168)
    _done()
    return results


@pytest.mark.gpu
@pytest.mark.multiproc
@pytest.mark.timeout(300)
@pytest.mark.parametrize("ranks", [2, 4])
def test_dispatch_combine_match_reference(ranks: int) -> None:
    if torch.cuda.device_count() < ranks:
        pytest.skip(f"needs {ranks} GPUs of one host")
    res = check_all_ok(run_ranks(_scenarios, ["ffn"] * ranks, timeout_s=280))
    # Every (token, k) pair of every rank lands on exactly one rank: the rows add up.
    assert sum(out["fp8.random.0"] for out in res) == sum([MAX_TOKENS, 0, 7, 13][:ranks]) * 3
    assert sum(out["none.full.1"] for out in res) == MAX_TOKENS * ranks * 4
    assert sum(out["step3"] for out in res) == 128 * ranks * 3
    assert all(out["fp8.no_tokens.2"] == 0 for out in res)


def _burst(ctx: RankContext) -> dict:
    """20 dispatch + combine calls back to back with fresh data and no host sync between
    them (the GPU queue runs ahead, ranks at full speed): every combine result must be
    its own call's. Then two dispatches in flight (hooks), combined in reverse order."""
    from afdkit.dispatch import IpcDispatcher
    from afdkit.dispatch.reference import check_dispatch_output, reference_dispatch

    _init(ctx)
    R, r, E, k, dev = ctx.world_size, ctx.rank, 6 * ctx.world_size, 3, f"cuda:{ctx.rank}"
    results: dict = {}
    for quant in ("fp8", "none"):
        disp = IpcDispatcher(None, E, MAX_TOKENS, HIDDEN, k, quant, timeout_s=GPU_TIMEOUT_S)
        calls = [_inputs(1000 + i, [(MAX_TOKENS - i) % (MAX_TOKENS + 1), i % 5, 11, MAX_TOKENS][:R], E, k)
                 for i in range(20)]
        outs = []
        for xs, ids, ws in calls:
            out = disp.dispatch(xs[r].to(dev), ids[r].to(dev), ws[r].to(dev), check_ids=False)
            outs.append(disp.combine(_experts(out, r, E // R, quant), out))
        torch.cuda.synchronize()
        disp.check()
        for i, (xs, ids, ws) in enumerate(calls):
            refs = reference_dispatch(xs, ids, ws, E, quant, max_tokens_per_rank=MAX_TOKENS)
            _, ys = _expected_combine(refs, r, E // R, quant)
            _check_combine(outs[i], refs, ys, r, f"rank {r} {quant} burst call {i}")
        # Two open dispatches (depth 2), combined in reverse order; a third must wait.
        calls = [_inputs(2000 + i, [MAX_TOKENS - i, 3 + i, 10, 1][:R], E, k) for i in range(3)]
        refs = [reference_dispatch(*c, E, quant, max_tokens_per_rank=MAX_TOKENS) for c in calls]
        hooks = [disp.dispatch(c[0][r].to(dev), c[1][r].to(dev), c[2][r].to(dev), return_recv_hook=True)
                 for c in calls[:2]]
        with pytest.raises(ValueError, match="receive hook before combining"):
            disp.combine(torch.zeros(disp.capacity, HIDDEN, dtype=torch.bfloat16, device=dev), disp._open[0])
        got = [hook() for hook in hooks]
        with pytest.raises(ValueError, match="already called"):
            hooks[0]()
        check_dispatch_output(got[1], refs[1][r], quant, what=f"rank {r} open call 1")
        with pytest.raises(ValueError, match="await their combine"):
            disp.dispatch(calls[2][0][r].to(dev), calls[2][1][r].to(dev), calls[2][2][r].to(dev))
        for i in (1, 0):  # slot 0's rows were not overwritten by the dispatch in slot 1
            if i == 0:
                check_dispatch_output(got[0], refs[0][r], quant, what=f"rank {r} open call 0")
            hook = disp.combine(_experts(got[i], r, E // R, quant), got[i], return_recv_hook=True)
            _, ys = _expected_combine(refs[i], r, E // R, quant)
            _check_combine(hook(), refs[i], ys, r, f"rank {r} {quant} open call {i}")
        out = disp.dispatch(calls[2][0][r].to(dev), calls[2][1][r].to(dev), calls[2][2][r].to(dev))
        check_dispatch_output(out, refs[2][r], quant, what=f"rank {r} call 2")
        disp.combine(_experts(out, r, E // R, quant), out)
        with pytest.raises(ValueError, match="not be combined yet"):
            disp.combine(_experts(out, r, E // R, quant), out)
        assert disp.pending() == 0
        disp.check()
        results[quant] = len(outs)
        disp.close()
    _done()
    return results


@pytest.mark.gpu
@pytest.mark.multiproc
@pytest.mark.timeout(300)
@pytest.mark.parametrize("ranks", [2, 4])
def test_back_to_back_calls_and_open_dispatches(ranks: int) -> None:
    if torch.cuda.device_count() < ranks:
        pytest.skip(f"needs {ranks} GPUs of one host")
    res = check_all_ok(run_ranks(_burst, ["ffn"] * ranks, timeout_s=280))
    assert all(out == {"fp8": 20, "none": 20} for out in res), res


def _graph(ctx: RankContext) -> dict:
    """dispatch (hook) + experts + combine (hook) captured in one CUDA graph, replayed
    with new inputs copied into the captured tensors; eager calls in between."""
    from afdkit.dispatch import IpcDispatcher
    from afdkit.dispatch.reference import check_dispatch_output, reference_dispatch

    _init(ctx)
    R, r, E, k, dev = ctx.world_size, ctx.rank, 4 * ctx.world_size, 2, f"cuda:{ctx.rank}"
    tokens = [MAX_TOKENS, 5, 17, 1][:R]
    disp = IpcDispatcher(None, E, MAX_TOKENS, HIDDEN, k, "fp8", timeout_s=GPU_TIMEOUT_S)
    xs, ids, ws = _inputs(3000, tokens, E, k)
    sx, sids, sw = xs[r].to(dev), ids[r].to(dev), ws[r].to(dev)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph (loads the kernels)
        out = disp.dispatch(sx, sids, sw)
        disp.combine(_experts(out, r, E // R, "fp8"), out)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_out = disp.dispatch(sx, sids, sw, return_recv_hook=True)()
        g_res = disp.combine(_experts(g_out, r, E // R, "fp8"), g_out, return_recv_hook=True)()
    assert disp.pending() == 0
    replays = 0
    for i in range(4):
        xs, ids, ws = _inputs(3100 + i, tokens, E, k)
        refs = reference_dispatch(xs, ids, ws, E, "fp8", max_tokens_per_rank=MAX_TOKENS)
        _, ys = _expected_combine(refs, r, E // R, "fp8")
        sx.copy_(xs[r])
        sids.copy_(ids[r])
        sw.copy_(ws[r])
        _poison(disp)
        graph.replay()
        torch.cuda.synchronize()
        disp.check()
        check_dispatch_output(g_out, refs[r], "fp8", what=f"rank {r} replay {i}")
        _check_combine(g_res.clone(), refs, ys, r, f"rank {r} replay {i}")
        replays += 1
        if i % 2:  # an eager call between replays takes the same slot
            case = {"name": "eager", "tokens": tokens, "experts": E, "top_k": k}
            _check_one(disp, ctx, case, "fp8", 3200 + i)
    disp.close()
    _done()
    return {"replays": replays}


@pytest.mark.gpu
@pytest.mark.multiproc
@pytest.mark.timeout(240)
@pytest.mark.parametrize("ranks", [2, 4])
def test_cuda_graph_capture_and_replay(ranks: int) -> None:
    if torch.cuda.device_count() < ranks:
        pytest.skip(f"needs {ranks} GPUs of one host")
    res = check_all_ok(run_ranks(_graph, ["ffn"] * ranks, timeout_s=220))
    assert all(out["replays"] == 4 for out in res), res


def _errors(ctx: RankContext) -> dict:
    """Bad arguments raise before anything moves (the same messages as the mesh backend);
    the dispatcher still works afterwards."""
    from afdkit.dispatch import Dispatcher, IpcDispatcher

    _init(ctx)
    E, k, dev = 4 * ctx.world_size, 2, f"cuda:{ctx.rank}"
    disp = Dispatcher(None, E, 8, HIDDEN, k, timeout_s=GPU_TIMEOUT_S)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(6, HIDDEN, generator=g).to(torch.bfloat16).to(dev)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(6)]).to(torch.int32).to(dev)
    w = torch.rand(6, k, generator=g).to(dev)
    bad = {
        "ids_range": (ValueError, lambda: disp.dispatch(x, ids + E, w)),
        "ids_duplicate": (ValueError, lambda: disp.dispatch(x, ids[:, :1].repeat(1, k), w)),
        "too_many_tokens": (ValueError, lambda: disp.dispatch(torch.cat([x, x]), torch.cat([ids, ids]),
                                                              torch.cat([w, w]))),
        "top_k": (ValueError, lambda: disp.dispatch(x, ids[:, :1], w[:, :1])),
        "x_dtype": (TypeError, lambda: disp.dispatch(x.float(), ids, w)),
        "weights_dtype": (TypeError, lambda: disp.dispatch(x, ids, w.double())),
        "hidden": (ValueError, lambda: disp.dispatch(x[:, :256], ids, w)),
        "device": (ValueError, lambda: disp.dispatch(x.cpu(), ids.cpu(), w.cpu())),
        "fp8_hidden": (ValueError, lambda: IpcDispatcher(None, E, 8, 200, k, "fp8")),
        "experts_split": (ValueError, lambda: IpcDispatcher(None, E + 1, 8, HIDDEN, k)),
        "quant": (ValueError, lambda: IpcDispatcher(None, E, 8, HIDDEN, k, "int4")),
        "depth": (ValueError, lambda: IpcDispatcher(None, E, 8, HIDDEN, k, depth=0)),
        "combine_handle": (ValueError, lambda: disp.combine(torch.zeros(1, HIDDEN, dtype=torch.bfloat16, device=dev),
                                                             object())),
    }
    messages = {}
    for name, (exc_type, call) in bad.items():
        with pytest.raises(exc_type) as info:
            call()
        messages[name] = str(info.value)
    x_strided = torch.randn(6, 2 * HIDDEN, generator=g).to(torch.bfloat16).to(dev)[:, ::2]  # copied, still right
    out = disp.dispatch(x_strided, ids, w)
    y = torch.zeros(disp.capacity, HIDDEN, dtype=torch.bfloat16, device=dev)
    with pytest.raises(TypeError, match="expert_out"):
        disp.combine(y.float(), out)
    got = disp.combine(y, out)
    assert torch.equal(got.cpu(), torch.zeros(6, HIDDEN, dtype=torch.bfloat16))
    disp.impl.check()
    disp.impl.close()
    with pytest.raises(RuntimeError, match="closed"):
        disp.dispatch(x, ids, w)
    _done()
    return messages


@pytest.mark.gpu
@pytest.mark.multiproc
@pytest.mark.timeout(180)
def test_validation_errors() -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs of one host")
    for msgs in check_all_ok(run_ranks(_errors, ["ffn"] * 2, timeout_s=160)):
        assert "expert ids must be in [0, " in msgs["ids_range"]
        assert "distinct" in msgs["ids_duplicate"]
        assert "exceed max_tokens_per_rank = 8" in msgs["too_many_tokens"]
        assert "built for top_k = 2" in msgs["top_k"]
        assert "works on cuda:" in msgs["device"]
        assert "hidden % 128 == 0" in msgs["fp8_hidden"]
        assert "multiple of the number of ranks (2)" in msgs["experts_split"]
        assert "not be combined yet" in msgs["combine_handle"]


def _silent(ctx: RankContext) -> dict:
    """Rank 1 builds the dispatcher but never dispatches: rank 0's receive kernel gives up
    after timeout_s and the host raises IpcTimeout naming rank 1; later calls refuse."""
    import torch.distributed as dist

    from afdkit.dispatch import IpcDispatcher
    from afdkit.dispatch.ipc import IpcError, IpcTimeout

    _init(ctx)
    timeout_s = ctx.args["timeout_s"]
    disp = IpcDispatcher(None, 4, 4, HIDDEN, 1, "none", timeout_s=timeout_s)
    result: dict = {}
    if ctx.rank == 0:
        xs, ids, ws = _inputs(4, [4, 4], 4, 1)
        dev = "cuda:0"
        t0 = time.monotonic()
        out = disp.dispatch(xs[0].to(dev), ids[0].to(dev), ws[0].to(dev))
        try:
            disp.check()
        except IpcTimeout as exc:
            result = {"msg": str(exc), "after_s": time.monotonic() - t0}
        with pytest.raises(IpcError, match="failed earlier"):
            disp.combine(torch.zeros(disp.capacity, HIDDEN, dtype=torch.bfloat16, device=dev), out)
    torch.cuda.synchronize()
    dist.barrier()
    disp.close()
    _done()
    return result


@pytest.mark.gpu
@pytest.mark.multiproc
@pytest.mark.timeout(120)
def test_silent_peer_times_out() -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs of one host")
    res = check_all_ok(run_ranks(_silent, ["ffn"] * 2, args={"timeout_s": 1.0}, timeout_s=100))
    out = res[0]
    assert out and 0.9 < out["after_s"] < 5.0, out
    assert "rank 1's dispatch" in out["msg"] and "rank 0" in out["msg"], out
