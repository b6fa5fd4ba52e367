"""Helpers shared by tests and benchmarks: error metrics and a GPU timer.

``calc_diff`` is the cosine-style discrepancy used for FP8 comparisons (1 - 2<x,y>/(|x|^2+|y|^2)):
0 for identical tensors, insensitive to a common scale. ``rel_l2`` is ||x - y|| / ||y||.
``bench`` times a CUDA callable with events, flushing L2 between repetitions so that
memory-bound kernels are not measured out of cache.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Callable

import torch


def rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64; NaN anywhere in x gives NaN (a failure)."""
    x64, r64 = x.double(), ref.double()
    denom = r64.norm().item()
    num = (x64 - r64).norm().item()
    return num / denom if denom > 0 else num


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """1 - cosine-like similarity in float64 (DeepEP's FP8 metric); 0 means identical."""
    x64, y64 = x.double(), y.double()
    denom = (x64 * x64 + y64 * y64).sum().item()
    if denom == 0:
        return 0.0
    return 1.0 - 2.0 * (x64 * y64).sum().item() / denom


@dataclass
class Timing:
    median_us: float
    p10_us: float
    p90_us: float
    reps: int


def bench(fn: Callable[[], object], *, warmup: int = 5, reps: int = 30, flush_l2: bool = True,
          graph: bool = False, flush: Callable[[], object] | None = None) -> Timing:
    """Median of ``reps`` event-timed calls of ``fn`` on the current CUDA stream.

    With ``flush_l2`` a 256 MB buffer is overwritten before every call (outside the
    timed region), so each call reads its inputs from HBM as it would in a decode step.
    With ``graph`` the call is captured once in a CUDA graph and its replays are timed:
    the device time of the op without Python and launch overhead (how a decode step
    runs in a serving engine). ``flush``, when given, replaces that overwrite: any call
    that readies the caches before each timed call (dev/mfa/flush_probe.py compares some).
    """
    if flush is None and flush_l2:
        buf = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
        flush = buf.zero_
    for _ in range(warmup):
        fn()
    if graph:
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        fn = g.replay
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        if flush is not None:
            flush()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends))
    return Timing(
        median_us=statistics.median(times),
        p10_us=times[max(0, len(times) // 10)],
        p90_us=times[min(len(times) - 1, (9 * len(times)) // 10)],
        reps=reps,
    )


def copy_bandwidth_gbs(nbytes: int = 1 << 30, reps: int = 20) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src), warmup=3, reps=reps, flush_l2=False)
    return 2 * nbytes / (t.median_us * 1e-6) / 1e9
