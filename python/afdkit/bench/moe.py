"""MoE benchmark on one GPU: route, permute (FP8), unpermute, and a whole Step-3 MoE layer.

The MoE layer at decode is bound by reading the expert weights that its tokens touch:
the floor is (bytes of the activated experts' FP8 weights + shared expert) / HBM bandwidth,
with the bandwidth taken from a device-to-device copy measured in the same run (bytes read
plus written over time). Route/permute/unpermute are timed as CUDA-graph replays; the
whole layer eagerly (it synchronises once to size the grouped GEMM).
"""

from __future__ import annotations

import argparse
from typing import Any, Sequence

import torch

from afdkit.bench.common import run_gpu_bench

HIDDEN, EXPERTS, TOP_K, INTER = 7168, 48, 3, 5120


def _layer_inputs(tokens: int, gen: torch.Generator):
    from afdkit import experts

    dev = "cuda"
    s = HIDDEN**-0.5
    gate = torch.randn(EXPERTS, INTER, HIDDEN, device=dev, generator=gen, dtype=torch.bfloat16) * s
    up = torch.randn(EXPERTS, INTER, HIDDEN, device=dev, generator=gen, dtype=torch.bfloat16) * s
    down = torch.randn(EXPERTS, HIDDEN, INTER, device=dev, generator=gen, dtype=torch.bfloat16) * INTER**-0.5
    w = experts.FP8ExpertWeights.from_dense(gate, up, down)
    del gate, up, down
    shared = tuple(torch.randn(shape, device=dev, generator=gen, dtype=torch.bfloat16) * shape[1] ** -0.5
                   for shape in ((INTER, HIDDEN), (INTER, HIDDEN), (HIDDEN, INTER)))
    u = torch.randn(tokens, HIDDEN, device=dev, generator=gen, dtype=torch.bfloat16)
    router = torch.randn(HIDDEN, EXPERTS, device=dev, generator=gen, dtype=torch.bfloat16) * s
    return u, router, w, shared


def run(token_counts: Sequence[int]) -> dict[str, Any]:
    from afdkit import experts, moe
    from afdkit.testing import bench, copy_bandwidth_gbs

    gen = torch.Generator(device="cuda").manual_seed(0)
    copy_gbs = copy_bandwidth_gbs()
    rows = []
    for tokens in token_counts:
        u, router, w, shared = _layer_inputs(tokens, gen)
        logits = u @ router
        weights, ids = moe.route(logits, TOP_K)
        permuted = moe.permute(u, ids, EXPERTS)
        y = torch.randn(tokens * TOP_K, HIDDEN, device="cuda", dtype=torch.bfloat16, generator=gen)
        # Graph replays: device time without Python overhead, as a captured decode step runs.
        t_route = bench(lambda: moe.route(logits, TOP_K), graph=True).median_us
        t_perm = bench(lambda: moe.permute(u, ids, EXPERTS), graph=True).median_us
        t_unperm = bench(lambda: moe.unpermute(y, permuted, weights), graph=True).median_us
        t_layer = bench(lambda: experts.moe_layer(u, logits, w, TOP_K, shared), reps=10).median_us
        active = int((torch.bincount(ids.flatten().long(), minlength=EXPERTS) > 0).sum())
        weight_bytes = active * 3 * INTER * HIDDEN + 3 * INTER * HIDDEN * 2  # FP8 routed + BF16 shared
        floor_us = weight_bytes / (copy_gbs * 1e9) * 1e6  # HBM rate = copy's read + write bytes / time
        rows.append(dict(tokens=tokens, route_us=t_route, permute_us=t_perm, unpermute_us=t_unperm,
                         layer_us=t_layer, active_experts=active, floor_us=floor_us,
                         fraction_of_floor=floor_us / t_layer))
        print(_fmt(rows[-1]), flush=True)
        del u, router, w, shared
        torch.cuda.empty_cache()
    return {"copy_gbs": copy_gbs, "rows": rows}


HEADER = f"{'tokens':>6} {'route us':>9} {'permute':>8} {'unperm':>8} {'layer us':>9} {'experts':>7} {'floor us':>9} {'floor/t':>7}"


def _fmt(r: dict[str, Any]) -> str:
    return (f"{r['tokens']:>6} {r['route_us']:>9.1f} {r['permute_us']:>8.1f} {r['unpermute_us']:>8.1f} "
            f"{r['layer_us']:>9.1f} {r['active_experts']:>7} {r['floor_us']:>9.1f} {r['fraction_of_floor']:>7.2f}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="afdkit bench moe", description=__doc__)
    p.add_argument("--tokens", type=int, nargs="+", default=[16, 128, 512])
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    return run_gpu_bench("moe", args, HEADER, lambda: run(args.tokens),
                         "# device-to-device copy: {copy_gbs:.0f} GB/s (read + write); floor = weight bytes / copy rate")
