#!/usr/bin/env python3
"""Mesh benchmark: one-way put latency (p50/p99) and bandwidth, 8 B .. 8 MB, next to
``ucx_perftest`` on the same transport (and NCCL send/recv on GPUs), plus the A->F->A
round trip of one Step-3 microbatch (128 tokens x 7168: 896 KiB FP8 out, 1.75 MiB
BF16 back) through the AFD channel, 1A1F and 2A2F.

    python3 bench/bench_mesh.py --transports shm tcp --out mesh.json
    python3 bench/bench_mesh.py --gpu --out mesh_gpu.json     # 2 GPUs (2A2F: 4): ipc + UCX cuda_ipc + NCCL

Latency is half the ping-pong round trip of put + fenced signal (ours) or of
ucp_put_lat (perftest). Bandwidth: a stream of puts of one size ended by one signal
and its acknowledgement (perftest's put_bw streams puts too). On CPUs the mesh loop
runs in C++ (Engine.bench_pingpong), like perftest; on GPUs every iteration is queued
on the stream first and timed with CUDA events, for the mesh and NCCL alike. The Step-3
round trip on GPUs runs the stream-ordered channel (recv views, fixed-slot send_back),
and a profiled run lists any kernel the transport launched (there should be none).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import Any

import torch

from afdkit.mesh.testing import UCX_ENVS, RankContext, check_all_ok, run_ranks

SIZES = [8, 64, 512, 4096, 32768, 262144, 1 << 20, 8 << 20]
STEP3_TOKENS, STEP3_HIDDEN = 128, 7168
GPU_UCX_ENV = {"UCX_TLS": "cuda_ipc,cuda_copy,tcp", "UCX_NET_DEVICES": "lo"}


def _iters(size: int, scale: float) -> int:
    return max(20, min(2000, int(scale * 2e8 / max(size, 4096))))


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


# ---- afdkit.mesh, core put + signal ------------------------------------------------


def _open_mesh(ctx: RankContext, mesh_id: str, ipc: bool):
    """This rank's Mesh on its GPU (or the CPU); the CUDA IPC backend only with ``ipc``."""
    from afdkit.mesh import Mesh, MeshConfig

    a = ctx.args
    dev = torch.device("cuda", ctx.rank) if a["gpu"] else torch.device("cpu")
    if a["gpu"]:
        torch.cuda.set_device(dev)
    m = Mesh(ctx.rank, ctx.world_size, ctx.role,
             MeshConfig(mesh_id=mesh_id, timeout_s=60, spin_us=a["spin_us"], ucx_options=dict(a.get("ucx_options", {})),
                        err_mode=a.get("err_mode", "auto"), device=ctx.rank if a["gpu"] and ipc else None))
    return m, dev


def _mesh_core(ctx: RankContext) -> dict:
    a = ctx.args
    m, dev = _open_mesh(ctx, "bench", ipc=a["ipc"])
    top = max(a["sizes"])
    src = m.alloc("src", top, dev)
    m.alloc("buf", top, dev)  # the peer's put target
    m.alloc("sig", 64, dev)
    m.connect(ctx.store(), b"bench-secret")
    e, peer = m.engine, 1 - ctx.rank
    rb, rs = m.remote(peer, "buf").handle, m.remote(peer, "sig").handle
    sig_ptr = m.local("sig").data_ptr()
    out: dict[Any, Any] = {}
    seq = 0
    for size in a["sizes"]:
        n = _iters(size, a["scale"])
        if a["gpu"]:
            lat, bw, seq = _gpu_pingpong(m, ctx.rank, peer, src, rb, rs, sig_ptr, size, n, seq)
        else:
            # The C++ loop of the engine (put + fenced signal, host wait): no Python per
            # message, like ucx_perftest. A Python loop adds ~1 us per call on top.
            lat_ns, bw_s, seq = e.bench_pingpong(ctx.rank == 0, peer, src.data_ptr(), rb, rs, sig_ptr, size, n + 10,
                                                 max(10, n // 2), seq)
            lat = [x / 1e3 for x in lat_ns[10:]]
            bw = size * max(10, n // 2) / bw_s / 1e6
        out[size] = {"p50_us": _pct(lat, 0.5), "p99_us": _pct(lat, 0.99), "bw_MBps": bw}
    out["backend"] = m.remote(peer, "buf").backend
    # The error handling mode and UCX's lanes of the endpoint ("rma_bw": zero-copy puts).
    out["endpoint"] = [ln.strip("# ").strip() for ln in m.endpoint_info(peer).splitlines()
                       if "afdkit.mesh endpoint" in ln or "lane[" in ln]
    out["stats"] = e.stats()
    out["err_mode"] = a.get("err_mode", "auto")
    m.close()
    return out


def _hold_stream(iters: int) -> None:
    """Keeps the GPU busy while the host queues ``iters`` iterations, so the timed loop
    measures the transport and not how fast Python enqueues (a ~20 us-per-iteration budget)."""
    from afdkit.bench.common import hold_stream

    hold_stream(min(iters * 20e-6, 0.5))


def _gpu_pingpong(m, rank: int, peer: int, src, rb: int, rs: int, sig_ptr: int, size: int, n: int,
                  seq: int) -> tuple[list[float], float, int]:
    """Stream-ordered ping-pong: everything is queued first, timed by CUDA events on
    rank 0's stream (one per round trip); then a stream of puts ended by one signal."""
    e = m.engine
    stream = torch.cuda.current_stream().cuda_stream
    events = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
    _hold_stream(2 * n)
    events[0].record()
    for i in range(n):
        seq += 1
        if rank == 0:
            e.put(src.data_ptr(), size, peer, rb, 0, rs, 0, seq, stream, ordered=True)
            e.wait_stream(sig_ptr, seq, stream, 60.0, peer, f"bench reply {seq}")
        else:
            e.wait_stream(sig_ptr, seq, stream, 60.0, peer, f"bench request {seq}")
            e.put(src.data_ptr(), size, peer, rb, 0, rs, 0, seq, stream, ordered=True)
        events[i + 1].record()
    torch.cuda.synchronize()
    m.check(peer)  # a watchdog release would make the numbers meaningless
    lat = [events[i].elapsed_time(events[i + 1]) * 1e3 / 2 for i in range(min(10, n - 1), n)]
    nb = max(10, n // 2)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    _hold_stream(nb)
    start.record()
    if rank == 0:
        for _ in range(nb):
            e.put(src.data_ptr(), size, peer, rb, 0, -1, 0, 0, stream, ordered=True)
        seq += 1
        e.put(src.data_ptr(), 0, peer, rb, 0, rs, 0, seq, stream, ordered=True)
        seq += 1
        e.wait_stream(sig_ptr, seq, stream, 60.0, peer, "bandwidth acknowledgement")
    else:
        seq += 1
        e.wait_stream(sig_ptr, seq, stream, 60.0, peer, "end of the bandwidth stream")
        seq += 1
        e.put(src.data_ptr(), 0, peer, rb, 0, rs, 0, seq, stream, ordered=True)
    end.record()
    torch.cuda.synchronize()
    m.check(peer)
    bw = size * nb / (start.elapsed_time(end) * 1e-3) / 1e6
    return lat, bw, seq


# ---- afdkit.mesh, the Step-3 microbatch through the AFD channel ------------------------------


def _step3_channel(ctx: RankContext, mesh_id: str):
    from afdkit.mesh import AfdChannel, ChannelConfig, TensorSpec

    m, dev = _open_mesh(ctx, mesh_id, ipc=True)
    m.connect(ctx.store(), b"bench-secret")
    send = (TensorSpec("u", (STEP3_HIDDEN,), torch.float8_e4m3fn),)
    recv = (TensorSpec("y", (STEP3_HIDDEN,), torch.bfloat16),)
    ch = AfdChannel(m, ChannelConfig(max_tokens=STEP3_TOKENS, send=send, recv=recv, num_microbatches=3,
                                     device=str(dev), stream_ordered=dev.type == "cuda"))
    return m, ch, dev


def _step3(ctx: RankContext) -> dict:
    """A->F->A round trips of one microbatch. CPU: the host protocol, timed per round trip
    on the host. GPU: the stream-ordered protocol, all round trips queued first and timed
    by CUDA events on attention rank 0's stream (recv views, send_back of fixed slots:
    nothing but copy engines and stream memory operations)."""
    a = ctx.args
    m, ch, dev = _step3_channel(ctx, "step3")
    u = torch.zeros(STEP3_TOKENS, STEP3_HIDDEN, dtype=torch.float8_e4m3fn, device=dev)
    n, warm = a["iters"], 5
    rtt: list[float] = []
    if a["gpu"]:
        y = torch.zeros(len(ch.att), STEP3_TOKENS, STEP3_HIDDEN, dtype=torch.bfloat16, device=dev)
        events = [torch.cuda.Event(enable_timing=True) for _ in range(n + warm + 1)]
        _hold_stream(n + warm)
        events[0].record()
        for layer in range(n + warm):
            if ch.is_attention:
                ch.send(layer, 0, u)
                ch.recv(layer, 0, reduce="views")
            else:
                ch.recv_batch_device(layer, 0)
                ch.send_back(layer, 0, y)
            events[layer + 1].record()
        torch.cuda.synchronize()
        m.check()
        rtt = [events[i].elapsed_time(events[i + 1]) * 1e-3 for i in range(warm, n + warm)]
    else:
        y = torch.zeros(STEP3_TOKENS * len(ch.att), STEP3_HIDDEN, dtype=torch.bfloat16, device=dev)
        for layer in range(n + warm):
            t0 = time.perf_counter()
            if ch.is_attention:
                ch.send(layer, 0, u)
                ch.recv(layer, 0, reduce=None)
            else:
                b = ch.recv_batch(layer, 0)
                ch.send_back(layer, 0, y[: b.num_rows])
            if layer >= warm:
                rtt.append(time.perf_counter() - t0)
    out = {"p50_us": _pct(rtt, 0.5) * 1e6, "p99_us": _pct(rtt, 0.99) * 1e6,
           "graph_safe": getattr(ch, "graph_safe", False)}
    if a["gpu"] and ch.graph_safe:
        out["graph"] = _step3_graph(ch, u, y, per_graph=16, replays=max(10, n // 16))
        torch.cuda.synchronize()
        m.check()
    m.close()
    return out


def _step3_graph(ch, u: torch.Tensor, y: torch.Tensor, per_graph: int, replays: int) -> dict:
    """The same round trips captured in one CUDA graph per side (``per_graph`` layers
    each) and replayed: no host work per message, so this is the transport's own time.
    Per round trip = replay time / per_graph, timed on attention rank 0's stream."""

    def round_trip(layer: int) -> None:
        if ch.is_attention:
            ch.send(layer, 1, u)
            ch.recv(layer, 1, reduce="views")
        else:
            ch.recv_batch_device(layer, 1)
            ch.send_back(layer, 1, y)

    side = torch.cuda.Stream()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):
        # Eager once per layer parity on the capture stream: allocations and kernels warm,
        # and the views held by recv(reduce="views") at capture start match those at its
        # end, so every replay releases exactly the slots the previous one held.
        round_trip(0)
        round_trip(1)
        with torch.cuda.graph(g, stream=side, capture_error_mode="thread_local"):
            for layer in range(per_graph):
                round_trip(layer)
    torch.cuda.synchronize()
    warm = 3
    events = [torch.cuda.Event(enable_timing=True) for _ in range(replays + 1)]
    with torch.cuda.stream(side):
        for _ in range(warm):
            g.replay()
        events[0].record()
        for i in range(replays):
            g.replay()
            events[i + 1].record()
    torch.cuda.synchronize()
    per = [events[i].elapsed_time(events[i + 1]) * 1e-3 / per_graph for i in range(replays)]
    return {"p50_us": _pct(per, 0.5) * 1e6, "p99_us": _pct(per, 0.99) * 1e6, "per_graph": per_graph,
            "replays": replays}


def _step3_profile(ctx: RankContext) -> dict:
    """Round trips under the torch profiler: the transport must launch no kernel."""
    from torch.profiler import ProfilerActivity, profile

    m, ch, dev = _step3_channel(ctx, "step3-profile")
    u = torch.zeros(STEP3_TOKENS, STEP3_HIDDEN, dtype=torch.float8_e4m3fn, device=dev)
    y = torch.zeros(len(ch.att), STEP3_TOKENS, STEP3_HIDDEN, dtype=torch.bfloat16, device=dev)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for layer in range(8):
            if ch.is_attention:
                ch.send(layer, 0, u)
                ch.recv(layer, 0, reduce="views")
            else:
                ch.recv_batch_device(layer, 0)
                ch.send_back(layer, 0, y)
        torch.cuda.synchronize()
    m.check()
    cuda_events = [ev for ev in prof.events() if ev.device_type == torch.autograd.DeviceType.CUDA]
    kernels = sorted({ev.name for ev in cuda_events if not ev.name.lower().startswith(("memcpy", "memset"))})
    copies = sum(1 for ev in cuda_events if ev.name.lower().startswith("memcpy"))
    m.close()
    return {"kernels": kernels, "copies": copies}


# ---- ucx_perftest ------------------------------------------------------------------------------


def _perftest_bin() -> tuple[str, str]:
    """ucx_perftest of the libucx wheel and the library path that makes it load the wheel's
    UCX (its own RPATH does not name it: without this it finds an older system libucp)."""
    import libucx

    root = os.path.dirname(libucx.__file__)
    libs = [os.path.join(root, "lib"), os.path.join(os.path.dirname(root), "libucx_cu13.libs")]
    return os.path.join(root, "bin", "ucx_perftest"), ":".join(d for d in libs if os.path.isdir(d))


def _perftest(test: str, size: int, iters: int, env: dict[str, str], mem: str, port: int,
              err_handling: bool = False) -> dict | None:
    exe, lib = _perftest_bin()
    penv = dict(os.environ, **env)
    penv.pop("RAPIDS_LIBUCX_PREFER_SYSTEM_LIBRARY", None)
    penv["LD_LIBRARY_PATH"] = lib + (":" + penv["LD_LIBRARY_PATH"] if penv.get("LD_LIBRARY_PATH") else "")
    args = ["-p", str(port), "-m", mem] + (["-e"] if err_handling else [])
    if mem == "cuda":
        server_env = dict(penv, CUDA_VISIBLE_DEVICES="1")
    else:
        server_env = penv
    server = subprocess.Popen([exe, *args], env=server_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        try:
            res = subprocess.run([exe, "127.0.0.1", *args, "-t", test, "-s", str(size), "-n", str(iters)],
                                 env=penv, capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired as exc:
            print(f"ucx_perftest {test} {size} B timed out: {(exc.stderr or b'')[-500:]!r}", file=sys.stderr)
            return None
    finally:
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("Final:")]
    if not line:
        print(f"ucx_perftest {test} {size} B gave no result: {res.stderr.strip()[-500:]}", file=sys.stderr)
        return None
    f = line[0].split()[1:]
    # iterations, lat p50, lat avg, lat overall, bw avg (MB/s), bw overall, msgrate avg, overall
    return {"p50_us": float(f[1]), "avg_us": float(f[2]), "bw_MBps": float(f[5]) * 1.048576}


def _perftests(env: dict[str, str], mem: str, scale: float, sizes: list[int], err_handling: bool = False) -> dict:
    out = {}
    port = 13000 + os.getpid() % 2000
    for size in sizes:
        n = _iters(size, scale)
        lat = _perftest("ucp_put_lat", size, n, env, mem, port, err_handling)
        bw = _perftest("ucp_put_bw", size, max(10, n // 2), env, mem, port + 1, err_handling)
        if lat and bw:
            out[size] = {"p50_us": lat["p50_us"], "bw_MBps": bw["bw_MBps"]}
    return out


# ---- NCCL ----------------------------------------------------------------------------------------


def _nccl(ctx: RankContext) -> dict:
    """NCCL send/recv, timed like the mesh on GPUs: all iterations queued first, CUDA
    events on rank 0's stream per round trip. Also the Step-3 round trip (1A1F)."""
    import torch.distributed as dist

    torch.cuda.set_device(ctx.rank)
    dist.init_process_group("nccl", store=ctx.store(), rank=ctx.rank, world_size=2)
    peer, out = 1 - ctx.rank, {}
    warm = 10

    def timed(n: int, body) -> list[float]:
        events = [torch.cuda.Event(enable_timing=True) for _ in range(n + warm + 1)]
        _hold_stream(n + warm)
        events[0].record()
        for i in range(n + warm):
            body()
            events[i + 1].record()
        torch.cuda.synchronize()
        return [events[i].elapsed_time(events[i + 1]) * 1e3 for i in range(warm, n + warm)]

    for size in ctx.args["sizes"]:
        x = torch.zeros(size, dtype=torch.uint8, device="cuda")
        n = _iters(size, ctx.args["scale"])

        def pingpong() -> None:
            if ctx.rank == 0:
                dist.send(x, peer)
                dist.recv(x, peer)
            else:
                dist.recv(x, peer)
                dist.send(x, peer)

        dist.barrier()
        rtt = timed(n, pingpong)
        lat = [t / 2 for t in rtt]
        out[size] = {"p50_us": _pct(lat, 0.5), "p99_us": _pct(lat, 0.99), "bw_MBps": size / _pct(lat, 0.5)}
    u = torch.zeros(STEP3_TOKENS * STEP3_HIDDEN, dtype=torch.uint8, device="cuda")
    y = torch.zeros(STEP3_TOKENS * STEP3_HIDDEN, dtype=torch.bfloat16, device="cuda")

    def step3() -> None:
        if ctx.rank == 0:
            dist.send(u, peer)
            dist.recv(y, peer)
        else:
            dist.recv(u, peer)
            dist.send(y, peer)

    dist.barrier()
    rtt = timed(ctx.args["iters"], step3)
    out["step3_1A1F"] = {"p50_us": _pct(rtt, 0.5), "p99_us": _pct(rtt, 0.99)}
    dist.destroy_process_group()
    return out


# ---- driver ----------------------------------------------------------------------------------------


def _median_of_runs(runs: list[dict]) -> dict:
    """Per size, the median over repeated runs of each number (a shared host's noise
    comes in bursts: one run's p50 can be off by 100x); the runs stay in the JSON."""
    out: dict[Any, Any] = {}
    for size in sorted({k for r in runs for k in r if isinstance(k, int)}):  # --sizes beyond SIZES too
        vals = [r[size] for r in runs if size in r]
        if vals:
            out[size] = {k: sorted(v[k] for v in vals)[len(vals) // 2] for k in vals[0]
                         if isinstance(vals[0][k], (int, float))}
    for key in ("backend", "stats", "err_mode", "endpoint"):
        if runs and key in runs[-1]:
            out[key] = runs[-1][key]
    return out


def _fmt_size(n: int) -> str:
    for unit, div in (("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= div:
            return f"{n // div} {unit}"
    return f"{n} B"


def _table(name: str, mesh: dict, ref: dict, ref_name: str) -> str:
    rows = [f"== {name}: afdkit.mesh ({mesh.get('backend', '?')}) vs {ref_name} ==",
            f"{'size':>7} | {'mesh p50':>9} {'p99':>9} | {ref_name + ' p50':>14} | {'lat x':>6} | "
            f"{'mesh MB/s':>10} | {ref_name + ' MB/s':>14} | {'bw x':>5}"]
    for size in sorted(k for k in mesh if isinstance(k, int)):
        m, r = mesh[size], ref.get(size)
        # perftest prints MB/s with 2 decimals: 8 B on a loaded host can read 0.00
        lat_ratio = f"{m['p50_us'] / r['p50_us']:.2f}" if r and r["p50_us"] > 0 else "-"
        bw_ratio = f"{m['bw_MBps'] / r['bw_MBps']:.2f}" if r and r["bw_MBps"] > 0 else "-"
        rows.append(f"{_fmt_size(size):>7} | {m['p50_us']:9.1f} {m['p99_us']:9.1f} | "
                    f"{(r['p50_us'] if r else float('nan')):14.1f} | {lat_ratio:>6} | {m['bw_MBps']:10.0f} | "
                    f"{(r['bw_MBps'] if r else float('nan')):14.0f} | {bw_ratio:>5}")
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--transports", nargs="+", default=["shm", "tcp"], choices=sorted(UCX_ENVS))
    p.add_argument("--gpu", action="store_true", help="GPU buffers: ipc, UCX cuda_ipc and NCCL (2 GPUs; 2A2F: 4)")
    p.add_argument("--scale", type=float, default=1.0, help="multiplies the iteration counts")
    p.add_argument("--spin-us", type=int, default=200, help="MeshConfig.spin_us of the benchmarked ranks")
    p.add_argument("--step3-iters", type=int, default=200, help="0: skip the Step-3 round trips")
    p.add_argument("--sizes", type=int, nargs="+", default=SIZES, help="message sizes in bytes")
    p.add_argument("--ucx-option", action="append", default=[], metavar="KEY=VALUE",
                   help="MeshConfig.ucx_options of the benchmarked ranks (perftest gets UCX_KEY=VALUE)")
    p.add_argument("--no-perftest", action="store_true")
    p.add_argument("--repeat", type=int, default=1,
                   help="run mesh and perftest this many times, interleaved; tables show per-size medians")
    p.add_argument("--err-mode", default="auto", choices=["auto", "peer", "none"],
                   help="MeshConfig.err_mode of the benchmarked ranks (auto: UCX failure reports where a "
                        "transport has them, e.g. tcp; perftest has none unless --perftest-err-handling)")
    p.add_argument("--perftest-err-handling", action="store_true",
                   help="run ucx_perftest with -e (endpoints with error handling, like the mesh's tcp endpoints)")
    p.add_argument("--no-nccl", action="store_true")
    p.add_argument("--step3-only", action="store_true",
                   help="only the Step-3 round trips (and, with --gpu, the profiler check and NCCL)")
    p.add_argument("--gpu-paths", nargs="+", default=["gpu-ipc", "gpu-ucx"], choices=["gpu-ipc", "gpu-ucx"])
    p.add_argument("--out", help="write all numbers as JSON here")
    args = p.parse_args(argv)
    results: dict[str, Any] = {"sizes": args.sizes}
    try:
        from afdkit.bench.common import environment

        results["environment"] = environment()
    except ImportError:
        pass
    results["environment_note"] = f"{os.cpu_count()} CPU cores visible; ranks, progress threads and perftest share them"
    results["load_average_start"] = os.getloadavg()  # other work on a shared host shows here
    gpus = torch.cuda.device_count() if args.gpu else 0
    if args.gpu and gpus < 2:
        print("--gpu needs 2 GPUs of one host", file=sys.stderr)
        return 2
    ucx_options = dict(o.split("=", 1) for o in args.ucx_option)
    base = {"sizes": args.sizes, "scale": args.scale, "spin_us": args.spin_us, "gpu": args.gpu,
            "ucx_options": ucx_options, "err_mode": args.err_mode}
    runs = [r for r in (("gpu-ipc", {}, True), ("gpu-ucx", GPU_UCX_ENV, False)) if r[0] in args.gpu_paths] \
        if args.gpu else [(t, UCX_ENVS[t], False) for t in args.transports]
    tables, step3_rows = [], []
    for name, env, ipc in runs:
        results[name] = {}
        if not args.step3_only:
            penv = dict(env, **{f"UCX_{k}": v for k, v in ucx_options.items() if not k.startswith("AFDKIT_")})
            mesh_runs, ref_runs = [], []
            for _ in range(args.repeat):  # interleaved, so both see the same load
                mesh_runs.append(check_all_ok(run_ranks(_mesh_core, ["attention", "ffn"], args={**base, "ipc": ipc},
                                                        env=env, timeout_s=600))[0])
                if not args.no_perftest:
                    ref_runs.append(_perftests(penv, "cuda" if args.gpu else "host", args.scale, args.sizes,
                                               args.perftest_err_handling))
            mesh, ref = _median_of_runs(mesh_runs), _median_of_runs(ref_runs)
            results[name] = {"mesh": mesh, "ucx_perftest": ref, "mesh_runs": mesh_runs, "ucx_perftest_runs": ref_runs}
            tables.append(_table(name, mesh, ref, "perftest"))
        for topo, roles in (("1A1F", ["attention", "ffn"]), ("2A2F", ["attention", "attention", "ffn", "ffn"])):
            if args.step3_iters <= 0:
                continue
            if args.gpu and gpus < len(roles):
                step3_rows.append(f"{name:>8} {topo}: skipped ({gpus} GPUs, needs {len(roles)})")
                continue
            iters = args.step3_iters if topo == "1A1F" else max(20, args.step3_iters // 4)
            r = check_all_ok(run_ranks(_step3, roles, args={**base, "ipc": ipc, "iters": iters}, env=env,
                                       timeout_s=600))
            results[name][f"step3_{topo}"] = r[0]
            step3_rows.append(f"{name:>8} {topo}: p50 {r[0]['p50_us']:8.1f} us  p99 {r[0]['p99_us']:8.1f} us"
                              + ("  eager, host-issued per message" if args.gpu else ""))
            if "graph" in r[0]:
                gr = r[0]["graph"]
                step3_rows.append(f"{name:>8} {topo}: p50 {gr['p50_us']:8.1f} us  p99 {gr['p99_us']:8.1f} us"
                                  f"  CUDA graph ({gr['per_graph']} round trips a replay)")
    if args.gpu:
        prof = check_all_ok(run_ranks(_step3_profile, ["attention", "ffn"], args={**base, "ipc": True},
                                      timeout_s=600))
        results["profile_1A1F"] = prof
        kernels = sorted({k for r in prof for k in r["kernels"]})
        step3_rows.append(f"profiler, 8 round trips 1A1F: {sum(r['copies'] for r in prof)} copies, "
                          f"kernels launched by the transport: {kernels if kernels else 'none'}")
        if not args.no_nccl:
            nccl = check_all_ok(run_ranks(_nccl, ["attention", "ffn"], args={**base, "iters": args.step3_iters},
                                          timeout_s=600))[0]
            results["nccl"] = nccl
            if "mesh" in results.get("gpu-ipc", {}):
                tables.append(_table("gpu-ipc", results["gpu-ipc"]["mesh"], nccl, "nccl"))
            s3 = nccl["step3_1A1F"]
            step3_rows.append(f"{'nccl':>8} 1A1F: p50 {s3['p50_us']:8.1f} us  p99 {s3['p99_us']:8.1f} us")
    tables.append("== Step-3 microbatch A->F->A (128 x 7168: 896 KB FP8 out, 1.75 MB BF16 back) ==\n"
                  + "\n".join(step3_rows))
    results["load_average_end"] = os.getloadavg()
    print("\n\n".join(tables))
    if args.out:
        import json

        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
