#!/usr/bin/env python3
"""How the L2 flush between timed calls changes small-batch decode times.

`afdkit.testing.bench` overwrites 256 MB before every timed call. Writing leaves the L2
full of dirty lines, which the timed kernel may pay to write back; a flush that only
reads 256 MB leaves the L2 equally cold (none of the op's data) but clean. This probe
times the same CUDA-graph replays after a write flush, a read flush and no flush, with a
1-element kernel as the zero-work reference and a D2D copy of the KV bytes, to tell how
much of a small-batch time is the flush's write-back rather than the op.

    python3 dev/mfa/flush_probe.py
"""

from __future__ import annotations

import torch

from afdkit import mfa
from afdkit.bench.mfa import _make_inputs
from afdkit.testing import bench

REPS = 30


def timed(fn, flush) -> float:
    """Median us of CUDA-graph replays of ``fn``, ``flush`` run before each (untimed)."""
    return bench(fn, reps=REPS, graph=True, flush=flush).median_us


def main() -> None:
    buf = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    sink = torch.empty((), dtype=torch.int64, device="cuda")
    flushes = {
        "write": lambda: buf.zero_(),
        "read": lambda: torch.sum(buf.view(torch.int64), dim=0, out=sink),
        "none": lambda: None,
    }
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.zeros(1, device="cuda")
    print(f"{'case':<22}" + "".join(f"{k:>10}" for k in flushes))
    print(f"{'tiny kernel':<22}" + "".join(f"{timed(lambda: x.add_(1), f):>10.1f}" for f in flushes.values()))
    for batch, ctx in ((1, 4096), (1, 32768), (8, 32768), (64, 4096), (128, 4096), (64, 32768)):
        q, k, v, table, lens = _make_inputs(batch, ctx, 1, torch.float8_e4m3fn, gen)
        scale = torch.tensor([0.125], device="cuda")
        plan = mfa.DecodePlan.create(q, k)
        plan.update(lens)
        out = torch.empty_like(q)
        fn = lambda: mfa.decode(q, k, v, table, lens, k_scale=scale, v_scale=scale, out=out, plan=plan,  # noqa: E731
                                check_indices=False)
        kv = torch.cat([k.flatten(), v.flatten()]).view(torch.uint8)
        dst = torch.empty_like(kv)
        print(f"{f'decode {batch}x{ctx}':<22}" + "".join(f"{timed(fn, f):>10.1f}" for f in flushes.values()))
        print(f"{f'copy KV {kv.numel() >> 20} MB':<22}" +
              "".join(f"{timed(lambda: dst.copy_(kv), f):>10.1f}" for f in flushes.values()))
        del q, k, v, table, lens, plan, out, kv, dst
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
