"""What one stream memory operation and one NVLink copy cost on this host, captured in
CUDA graphs (no host work per op): the budget of the stream-ordered channel's round trip.

    python3 dev/mesh/memops_bench.py [--ops 200] [--replays 10]

One process, two GPUs (peer memory through UVA). Every row: a graph of ``--ops`` copies of
one operation on a stream of GPU 0, replayed; per-op time = replay time / ops (median).
Driver entry points are called through ctypes, so nothing here depends on afdkit's build.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys

import torch

WRITE_DEFAULT, WRITE_NO_BARRIER = 0, 1
WAIT_GEQ, WAIT_FLUSH = 0, 1 << 30


def _driver() -> ctypes.CDLL:
    cu = ctypes.CDLL("libcuda.so.1")
    for name in ("cuStreamWriteValue64_v2", "cuStreamWaitValue64_v2", "cuMemcpyAsync"):
        getattr(cu, name).restype = ctypes.c_int
    cu.cuStreamWriteValue64_v2.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint]
    cu.cuStreamWaitValue64_v2.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint]
    cu.cuMemcpyAsync.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p]
    return cu


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"{what} failed with CUresult {rc}")


def _timed(body, ops: int, replays: int) -> float:
    """Median per-op microseconds of a graph holding ``ops`` calls of ``body``."""
    s = torch.cuda.Stream(0)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s):
        body(s.cuda_stream)  # eager once: errors surface here, not in capture
        torch.cuda.synchronize(0)
        with torch.cuda.graph(g, stream=s, capture_error_mode="thread_local"):
            for _ in range(ops):
                body(s.cuda_stream)
        for _ in range(2):
            g.replay()
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(replays + 1)]
        ev[0].record()
        for i in range(replays):
            g.replay()
            ev[i + 1].record()
    torch.cuda.synchronize(0)
    return statistics.median(ev[i].elapsed_time(ev[i + 1]) for i in range(replays)) * 1e3 / ops


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", type=int, default=200)
    p.add_argument("--replays", type=int, default=10)
    a = p.parse_args(argv)
    if torch.cuda.device_count() < 2:
        print("needs 2 GPUs", file=sys.stderr)
        return 2
    cu = _driver()
    torch.cuda.set_device(0)
    local = torch.ones(64, dtype=torch.int64, device="cuda:0")
    peer = torch.ones(64, dtype=torch.int64, device="cuda:1")
    host = torch.ones(64, dtype=torch.int64).pin_memory()  # UVA: the host pointer is device-usable
    src = torch.zeros(2 << 20, dtype=torch.uint8, device="cuda:0")
    dst = torch.zeros(2 << 20, dtype=torch.uint8, device="cuda:1")
    src.copy_(src)
    dst.copy_(src.to("cuda:1"))  # enables peer access between the two devices
    torch.cuda.synchronize()

    def write(word: torch.Tensor, flags: int):
        return lambda st: _check(cu.cuStreamWriteValue64_v2(st, word.data_ptr(), 1, flags), "write")

    def wait(word: torch.Tensor, flags: int):
        return lambda st: _check(cu.cuStreamWaitValue64_v2(st, word.data_ptr(), 1, flags), "wait")

    def copy(nbytes: int):
        return lambda st: _check(cu.cuMemcpyAsync(dst.data_ptr(), src.data_ptr(), nbytes, st), "copy")

    rows = [
        ("write local, fenced", write(local, WRITE_DEFAULT)),
        ("write local, no barrier", write(local, WRITE_NO_BARRIER)),
        ("write peer (NVLink), fenced", write(peer, WRITE_DEFAULT)),
        ("write peer (NVLink), no barrier", write(peer, WRITE_NO_BARRIER)),
        ("write host-mapped, fenced", write(host, WRITE_DEFAULT)),
        ("write host-mapped, no barrier", write(host, WRITE_NO_BARRIER)),
        ("wait local (already set)", wait(local, WAIT_GEQ)),
        ("wait local + flush (already set)", wait(local, WAIT_GEQ | WAIT_FLUSH)),
        ("wait host-mapped (already set)", wait(host, WAIT_GEQ)),
        ("copy peer 8 B", copy(8)),
        ("copy peer 64 KB", copy(64 << 10)),
        ("copy peer 896 KB", copy(896 << 10)),
        ("copy peer 1.75 MB", copy(1792 << 10)),
    ]
    print(f"{'operation':36} {'us/op':>9} {'GB/s':>8}")
    for name, body in rows:
        try:
            us = _timed(body, a.ops if "copy peer 1" not in name else max(20, a.ops // 10), a.replays)
        except RuntimeError as exc:
            print(f"{name:36} {'refused':>9}  ({exc})")
            continue
        nb = {"8 B": 8, "64 KB": 64 << 10, "896 KB": 896 << 10, "1.75 MB": 1792 << 10}
        size = next((v for k, v in nb.items() if name.endswith(k)), 0)
        print(f"{name:36} {us:9.2f} {size / us / 1e3 if size else float('nan'):8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
