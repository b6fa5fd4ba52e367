"""MFA decode benchmark: afdkit's FP8 kernel vs the copy-bandwidth ceiling and torch SDPA.

For each (batch, context, q_len): time of one decode call, KV GB/s (FP8 K+V bytes read /
time), the ratio to a device-to-device copy measured in the same process, TFLOP/s, and the
same shape through torch SDPA (flash backend if it takes the shape, BF16 KV, enable_gqa).
"""

from __future__ import annotations

import argparse
from typing import Any, Sequence

import torch

from afdkit.bench.common import run_gpu_bench

NUM_Q_HEADS, HEAD_DIM, PAGE_SIZE = 64, 256, 64


def _make_inputs(batch: int, context: int, q_len: int, kv_dtype: torch.dtype, gen: torch.Generator):
    pages_per_seq = context // PAGE_SIZE
    num_pages = batch * pages_per_seq
    dev = "cuda"
    q = torch.randn(batch, q_len, NUM_Q_HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16, generator=gen)
    k = torch.randn(num_pages, PAGE_SIZE, 1, HEAD_DIM, device=dev, dtype=torch.bfloat16, generator=gen)
    v_ = torch.randn(num_pages, PAGE_SIZE, 1, HEAD_DIM, device=dev, dtype=torch.bfloat16, generator=gen)
    if kv_dtype == torch.float8_e4m3fn:
        k, v_ = (k * 8).to(kv_dtype), (v_ * 8).to(kv_dtype)
    perm = torch.randperm(num_pages, device=dev, generator=gen).to(torch.int32)
    block_table = perm.view(batch, pages_per_seq)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=dev)
    return q, k, v_, block_table, seq_lens


def _sdpa_time(batch: int, context: int, q_len: int, gen: torch.Generator) -> tuple[float | None, str]:
    """BF16-KV SDPA on the same shape; returns (median us, backend used)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from afdkit.testing import bench

    q = torch.randn(batch, NUM_Q_HEADS, q_len, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(batch, 1, context, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    v_ = torch.randn_like(k)
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
        try:
            with sdpa_kernel(backend):
                fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v_, enable_gqa=True)  # noqa: E731
                fn()
                return bench(fn).median_us, backend.name.lower()
        except RuntimeError:
            continue
    return None, "none"


def run(batches: Sequence[int], contexts: Sequence[int], q_lens: Sequence[int], sdpa: bool) -> dict[str, Any]:
    from afdkit import mfa
    from afdkit.testing import bench, copy_bandwidth_gbs

    gen = torch.Generator(device="cuda").manual_seed(0)
    copy_gbs = copy_bandwidth_gbs()
    rows = []
    for context in contexts:
        for batch in batches:
            for q_len in q_lens:
                q, k, v_, table, lens = _make_inputs(batch, context, q_len, torch.float8_e4m3fn, gen)
                scale = torch.tensor([0.125], device="cuda")
                plan = mfa.DecodePlan.create(q, k)
                plan.update(lens)
                out = torch.empty_like(q)
                fn = lambda: mfa.decode(q, k, v_, table, lens, k_scale=scale, v_scale=scale,  # noqa: E731
                                        out=out, plan=plan, check_indices=False)
                t = bench(fn, graph=True).median_us  # device time of a captured step
                kv_bytes = batch * context * 2 * HEAD_DIM  # fp8 K + V, one KV head
                gbs = kv_bytes / (t * 1e-6) / 1e9
                flops = 4 * batch * q_len * NUM_Q_HEADS * HEAD_DIM * context
                row = dict(batch=batch, context=context, q_len=q_len, us=t, kv_gbs=gbs,
                           ratio_to_copy=gbs / copy_gbs, tflops=flops / (t * 1e-6) / 1e12)
                if sdpa:
                    sdpa_us, backend = _sdpa_time(batch, context, q_len, gen)
                    row.update(sdpa_us=sdpa_us, sdpa_backend=backend,
                               speedup_vs_sdpa=(sdpa_us / t) if sdpa_us else None)
                rows.append(row)
                print(_fmt(row), flush=True)
                del q, k, v_, table, lens, plan, out
                torch.cuda.empty_cache()
    return {"copy_gbs": copy_gbs, "rows": rows}


HEADER = f"{'batch':>5} {'ctx':>6} {'qlen':>4} {'us':>9} {'KV GB/s':>8} {'/copy':>6} {'TFLOP/s':>8} {'sdpa us':>9} {'x sdpa':>7}"


def _fmt(r: dict[str, Any]) -> str:
    sdpa = f"{r['sdpa_us']:>9.1f} {r['speedup_vs_sdpa']:>7.2f}" if r.get("sdpa_us") else f"{'-':>9} {'-':>7}"
    return (f"{r['batch']:>5} {r['context']:>6} {r['q_len']:>4} {r['us']:>9.1f} {r['kv_gbs']:>8.0f} "
            f"{r['ratio_to_copy']:>6.2f} {r['tflops']:>8.1f} {sdpa}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="afdkit bench mfa", description=__doc__)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64, 128])
    p.add_argument("--context", type=int, nargs="+", default=[4096, 32768])
    p.add_argument("--q-len", type=int, nargs="+", default=[1, 2])
    p.add_argument("--no-sdpa", action="store_true", help="skip the torch SDPA baseline")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    return run_gpu_bench("mfa", args, HEADER, lambda: run(args.batch, args.context, args.q_len, not args.no_sdpa),
                         "# device-to-device copy: {copy_gbs:.0f} GB/s (read + write), measured in this run")
