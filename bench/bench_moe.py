#!/usr/bin/env python3
"""MoE benchmarks.

    bench_moe.py [--tokens ...] [--out F]     one GPU: route, permute, unpermute, a whole
                                              layer (same as `afdkit bench moe`; see
                                              afdkit/bench/moe.py)
    bench_moe.py dispatch [--ranks 2 4] [--tokens 16 128 512] [--iters N] [--out F]
                                              several GPUs of one host: the CUDA IPC
                                              dispatcher against NCCL all_to_all_single

The dispatch section spawns R processes (one per GPU, NCCL group) for each R that the
host has GPUs for, and per tokens-per-rank T (hidden 7168, 48 experts, top-3, FP8,
random routing drawn from one seed on every rank): dispatch (send + receive) and
combine are captured in two CUDA graphs and replayed alternately, timed with CUDA
events around each replay after a barrier; the median over iterations is reported (the
slowest rank's). GB/s counts the bytes a rank stores into other GPUs (NVLink): per
token and destination rank one row of FP8 codes + scales, plus every token's top-k ids
and weights at every rank, in dispatch; one bf16 row per token and rank in combine.
The baseline moves the same per-destination byte counts (its own rank's included, as
ours) with torch.distributed.all_to_all_single in the same run; "nccl/ours" > 1 means
the IPC dispatcher is faster.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
from typing import Any, Sequence

import torch

HIDDEN, EXPERTS, TOP_K = 7168, 48, 3


def _routing(ranks: int, tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from afdkit.dispatch.reference import random_routing

    g = torch.Generator().manual_seed(1234 + tokens)
    return [random_routing(tokens, TOP_K, EXPERTS, g) for _ in range(ranks)]


def _split_bytes(routes: list[tuple[torch.Tensor, torch.Tensor]],
                 ranks: int) -> tuple[list[list[int]], list[list[int]]]:
    """dispatch[s][d]: bytes rank s stores at rank d; combine[d][s]: bytes rank d stores at s.

    Dispatch: FP8 codes + scales per token and destination rank, and the top-k ids and
    weights of every token at every rank (receivers scan them); combine: one bf16 row per
    token and rank owning one of its experts."""
    local = EXPERTS // ranks
    payload, meta = HIDDEN + 4 * (HIDDEN // 128), 8 * TOP_K
    dispatch = [[0] * ranks for _ in range(ranks)]
    combine = [[0] * ranks for _ in range(ranks)]
    for s, (ids, _) in enumerate(routes):
        dest = torch.zeros(ids.shape[0], ranks, dtype=torch.bool)
        dest.scatter_(1, ids.long() // local, True)
        per_rank = dest.sum(0).tolist()
        for d in range(ranks):
            dispatch[s][d] = payload * per_rank[d] + meta * ids.shape[0]
            combine[d][s] = 2 * HIDDEN * per_rank[d]
    return dispatch, combine


def _hold_stream(iters: int) -> None:
    """The stream waits while the timed iterations are queued (~60 us of host work each:
    graph replays and event records); see afdkit.bench.common.hold_stream."""
    from afdkit.bench.common import hold_stream

    hold_stream(iters * 60e-6)


def _median_ms(pairs: list[tuple[torch.cuda.Event, torch.cuda.Event]]) -> float:
    return statistics.median(a.elapsed_time(b) for a, b in pairs)


def _time_ipc(disp: Any, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, iters: int) -> tuple[float, float]:
    """Median ms of dispatch and combine, each a CUDA-graph replay."""
    import torch.distributed as dist

    y = torch.randn(disp.capacity, HIDDEN, device=x.device, dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: loads the kernels, outside any graph
        for _ in range(3):
            disp.combine(y, disp.dispatch(x, ids, w))
    torch.cuda.current_stream().wait_stream(side)
    g_dispatch, g_combine = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(g_dispatch):
        out = disp.dispatch(x, ids, w)
    with torch.cuda.graph(g_combine):
        disp.combine(y, out)
    for _ in range(5):
        g_dispatch.replay()
        g_combine.replay()
    torch.cuda.synchronize()
    dist.barrier()
    _hold_stream(iters)
    ev = [[torch.cuda.Event(enable_timing=True) for _ in range(3)] for _ in range(iters)]
    for e in ev:
        e[0].record()
        g_dispatch.replay()
        e[1].record()
        g_combine.replay()
        e[2].record()
    torch.cuda.synchronize()
    disp.check()
    return _median_ms([(e[0], e[1]) for e in ev]), _median_ms([(e[1], e[2]) for e in ev])


def _time_nccl(send: list[int], recv: list[int], iters: int) -> float:
    """Median ms of all_to_all_single moving ``send[d]`` bytes to each rank d."""
    import torch.distributed as dist

    inp = torch.ones(max(1, sum(send)), dtype=torch.uint8, device="cuda")[:sum(send)]
    out = torch.empty(sum(recv), dtype=torch.uint8, device="cuda")
    for _ in range(5):
        dist.all_to_all_single(out, inp, recv, send)
    torch.cuda.synchronize()
    dist.barrier()
    _hold_stream(iters)
    pairs = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dist.all_to_all_single(out, inp, recv, send)
        b.record()
        pairs.append((a, b))
    torch.cuda.synchronize()
    return _median_ms(pairs)


def _bench_tokens(tokens: int, ranks: int, rank: int, iters: int) -> dict[str, Any]:
    from afdkit.dispatch import IpcDispatcher

    routes = _routing(ranks, tokens)
    dsend, csend = _split_bytes(routes, ranks)
    ids, w = (t.cuda() for t in routes[rank])
    x = torch.randn(tokens, HIDDEN, device="cuda", dtype=torch.bfloat16)
    with IpcDispatcher(None, EXPERTS, tokens, HIDDEN, TOP_K, "fp8", check_ids=False) as disp:
        t_d, t_c = _time_ipc(disp, x, ids, w, iters)
    n_d = _time_nccl(dsend[rank], [dsend[s][rank] for s in range(ranks)], iters)
    n_c = _time_nccl(csend[rank], [csend[d][rank] for d in range(ranks)], iters)
    nvlink_d = sum(b for d, b in enumerate(dsend[rank]) if d != rank)
    nvlink_c = sum(b for s, b in enumerate(csend[rank]) if s != rank)
    return dict(tokens=tokens, dispatch_ms=t_d, combine_ms=t_c, nccl_dispatch_ms=n_d, nccl_combine_ms=n_c,
                dispatch_nvlink_bytes=nvlink_d, combine_nvlink_bytes=nvlink_c)


def _rank_main(ctx: Any) -> list[dict[str, Any]]:
    import torch.distributed as dist

    torch.cuda.set_device(ctx.rank)
    dist.init_process_group("nccl", store=ctx.store(), rank=ctx.rank, world_size=ctx.world_size,
                            timeout=datetime.timedelta(seconds=120), device_id=torch.device("cuda", ctx.rank))
    try:
        return [_bench_tokens(t, ctx.world_size, ctx.rank, ctx.args["iters"]) for t in ctx.args["tokens"]]
    finally:
        dist.destroy_process_group()


def _summarize(ranks: int, per_rank: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The slowest rank's medians; GB/s from the mean NVLink bytes per rank."""
    rows = []
    for i, first in enumerate(per_rank[0]):
        at = [pr[i] for pr in per_rank]
        worst = {k: max(a[k] for a in at) for k in ("dispatch_ms", "combine_ms", "nccl_dispatch_ms", "nccl_combine_ms")}
        bytes_d = statistics.mean(a["dispatch_nvlink_bytes"] for a in at)
        bytes_c = statistics.mean(a["combine_nvlink_bytes"] for a in at)
        rows.append(dict(ranks=ranks, tokens=first["tokens"], **worst,
                         dispatch_gbs=bytes_d / (worst["dispatch_ms"] * 1e6),
                         combine_gbs=bytes_c / (worst["combine_ms"] * 1e6),
                         nccl_over_ours_dispatch=worst["nccl_dispatch_ms"] / worst["dispatch_ms"],
                         nccl_over_ours_combine=worst["nccl_combine_ms"] / worst["combine_ms"],
                         per_rank=at))
    return rows


HEADER = (f"{'ranks':>5} {'tokens':>6} {'disp us':>8} {'GB/s':>6} {'nccl us':>8} {'nccl/us':>7} "
          f"{'comb us':>8} {'GB/s':>6} {'nccl us':>8} {'nccl/us':>7}")


def _fmt(r: dict[str, Any]) -> str:
    return (f"{r['ranks']:>5} {r['tokens']:>6} {1e3 * r['dispatch_ms']:>8.1f} {r['dispatch_gbs']:>6.1f} "
            f"{1e3 * r['nccl_dispatch_ms']:>8.1f} {r['nccl_over_ours_dispatch']:>7.2f} "
            f"{1e3 * r['combine_ms']:>8.1f} {r['combine_gbs']:>6.1f} {1e3 * r['nccl_combine_ms']:>8.1f} "
            f"{r['nccl_over_ours_combine']:>7.2f}")


def dispatch_main(argv: Sequence[str]) -> int:
    from afdkit.bench.common import environment, write_json

    p = argparse.ArgumentParser(prog="bench_moe.py dispatch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    p.add_argument("--tokens", type=int, nargs="+", default=[16, 128, 512], help="tokens per rank")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--timeout-s", type=float, default=600.0, help="per number of ranks")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    runnable = [r for r in args.ranks if 2 <= r <= gpus]
    skipped = {r: f"needs {r} GPUs of one host, found {gpus}" for r in args.ranks if r not in runnable}
    for r, why in skipped.items():
        print(f"# dispatch, {r} ranks: skipped ({why})")
    if not runnable:
        print("bench_moe.py dispatch: needs at least 2 GPUs of one host; nothing to run")
        write_json(args.out, {"env": environment(), "skipped": {str(k): v for k, v in skipped.items()}, "rows": []})
        return 0
    from afdkit.mesh.testing import check_all_ok, run_ranks

    env = environment()
    print(f"# {env.get('device')}  commit {env.get('commit')}  {env['date']}")
    print(f"# hidden {HIDDEN}, {EXPERTS} experts, top-{TOP_K}, FP8; medians of {args.iters} CUDA-graph replays")
    print(HEADER)
    rows = []
    for ranks in runnable:
        per_rank = check_all_ok(run_ranks(_rank_main, ["ffn"] * ranks, timeout_s=args.timeout_s,
                                          args={"tokens": args.tokens, "iters": args.iters}))
        for row in _summarize(ranks, per_rank):
            print(_fmt(row), flush=True)
            rows.append(row)
    write_json(args.out, {"env": env, "skipped": {str(k): v for k, v in skipped.items()}, "rows": rows})
    return 0


def main(argv: Sequence[str]) -> int:
    if argv and argv[0] == "dispatch":
        return dispatch_main(argv[1:])
    from afdkit.bench.moe import main as single_gpu_main

    return single_gpu_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
