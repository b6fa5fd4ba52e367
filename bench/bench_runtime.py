#!/usr/bin/env python3
"""AFD vs colocated decode of full-width Step-3 layers on 2 or 4 GPUs of one host.

    python3 bench/bench_runtime.py --out runtime.json        # or: afdkit bench runtime --out ...

Full-width layers (hidden 7168, 64 query heads over one 256-wide K/V head, 48 experts
top-3 in FP8, shared expert, dense first and last layer), as many layers as fit one GPU
holding the whole model (the colocated case), 4K context, FP8 KV cache. On the same
GPUs, in one run:

- AFD: 1A1F on 2 GPUs, 2A2F on 4 (``--topologies`` to choose), 3 microbatches, the FFN
  split ``--routing`` (broadcast = tensor parallel by default);
- colocated: every GPU holds all layers (attention + all experts) and decodes its share
  of the batch alone.

For each mode it sweeps the batch and keeps the fastest run whose TPOT per layer fits
the Step-3 budget (50 ms / 61 layers = 820 us), then reports tokens/s per GPU, TPOT and
the 61-layer equivalent (tokens/s per GPU x layers / 61: the same step time per layer
spread over 61 layers) next to the Step-3 report's 4,039 tokens/s per GPU (H800, 4K,
FP8, no MTP). Writes ``--out`` (JSON) and a markdown table next to it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

STEP3_TOKENS_PER_GPU = 4039.0
TPOT_BUDGET_MS = 50.0
STEP3_LAYERS = 61
GIB = 1 << 30


def _layer_bytes(batch_per_gpu: int, context: int, steps: int) -> dict[str, float]:
    """Bytes per layer on one GPU: attention weights (bf16), FFN (FP8 experts, bf16
    shared expert), KV cache (FP8 K+V + fp32 scales per token)."""
    h, heads, hd, qlat, e, inter = 7168, 64, 256, 2048, 48, 5120
    attn = 2 * (h * (qlat + 2 * hd) + qlat * heads * hd + heads * hd * h)
    ffn = e * 3 * h * inter + 2 * 3 * h * inter
    kv = batch_per_gpu * (context + steps + 64) * (2 * hd + 8)
    return {"attention": attn, "ffn": ffn, "kv": kv}


def auto_layers(gpu_bytes: int, max_batch_per_gpu: int, context: int, steps: int) -> int:
    """Layers that fit the colocated case (whole layers + KV on one GPU), keeping room
    for embedding + LM head (3.7 GB), the load-time expert staging (11 GB) and slack."""
    per = _layer_bytes(max_batch_per_gpu, context, steps)
    free = gpu_bytes * 0.9 - 3.7 * GIB - 11 * GIB - 4 * GIB
    return max(3, int(free // (per["attention"] + per["ffn"] + per["kv"])))


def _run(cfg: Any) -> dict[str, Any]:
    from afdkit.runtime import report
    from afdkit.runtime.launch import launch_local

    t0 = time.monotonic()
    outcome = launch_local(cfg)
    if not outcome.ok:
        return {"ok": False, "error": outcome.failure_message(), "config": cfg.to_dict()}
    s = report.summarize(cfg, outcome.results)
    return {"ok": True, "summary": s.as_dict(), "config": cfg.to_dict(), "wall_s": time.monotonic() - t0}


def _row(res: dict[str, Any], gpus: int) -> dict[str, Any]:
    s, c = res["summary"], res["config"]
    layers = s["layers"]
    per_layer_us = s["tpot_p50_ms"] * 1e3 / layers
    eq61 = s["tokens_per_s_per_gpu"] * layers / STEP3_LAYERS
    mode = s["mode"] + (" (stream)" if c.get("channel") == "stream" and not c.get("colocated") else "")
    return {"mode": mode, "topology": s["topology"], "gpus": gpus, "layers": layers, "batch": c["batch"],
            "context": c["context"], "tpot_p50_ms": s["tpot_p50_ms"], "tpot_p99_ms": s["tpot_p99_ms"],
            "tpot_per_layer_us": per_layer_us, "tokens_per_s": s["tokens_per_s"],
            "tokens_per_s_per_gpu": s["tokens_per_s_per_gpu"], "eq61_tokens_per_s_per_gpu": eq61,
            "vs_step3": eq61 / STEP3_TOKENS_PER_GPU,
            "within_budget": per_layer_us <= TPOT_BUDGET_MS * 1e3 / STEP3_LAYERS,
            "stage_us": s["stage_us"], "a2f_us": s["a2f_us"], "f2a_us": s["f2a_us"],
            "transfer_share": s["transfer_share"]}


def _markdown(rows: list[dict[str, Any]], best: dict[str, dict[str, Any]], env: dict[str, Any]) -> str:
    lines = [f"# runtime: AFD vs colocated, full-width Step-3 layers ({env.get('device')}, commit {env.get('commit')}, "
             f"{env.get('date')})", "",
             f"TPOT budget per layer: {TPOT_BUDGET_MS * 1e3 / STEP3_LAYERS:.0f} us (50 ms / 61 layers). "
             f"61-layer equivalent = tokens/s/GPU x layers / 61. Step-3 report: {STEP3_TOKENS_PER_GPU:.0f} "
             "tokens/s/GPU (H800, 4K, FP8, no MTP).", "",
             "| mode | topology | GPUs | layers | batch | TPOT p50 ms | p99 ms | us/layer | tok/s/GPU | 61-layer eq. "
             "tok/s/GPU | vs 4,039 | in budget | xfer share |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mark = " **best**" if best.get(r["mode"]) is r else ""
        lines.append(f"| {r['mode']}{mark} | {r['topology']} | {r['gpus']} | {r['layers']} | {r['batch']} | "
                     f"{r['tpot_p50_ms']:.2f} | {r['tpot_p99_ms']:.2f} | {r['tpot_per_layer_us']:.0f} | "
                     f"{r['tokens_per_s_per_gpu']:.0f} | {r['eq61_tokens_per_s_per_gpu']:.0f} | {r['vs_step3']:.2f} | "
                     f"{'yes' if r['within_budget'] else 'no'} | {r['transfer_share']:.0%} |")
    if "afd" in best and "colocated" in best:
        a, c = best["afd"], best["colocated"]
        ratio = a["tokens_per_s_per_gpu"] / c["tokens_per_s_per_gpu"]
        lines += ["", f"AFD / colocated at equal TPOT budget: {ratio:.2f}x tokens/s per GPU."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_runtime", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, help="GPUs to use (2 or 4; default: 4 if present, else 2)")
    p.add_argument("--topologies", nargs="+", help="AFD shapes like 1A1F 2A2F (default: 1A1F on 2 GPUs, 2A2F on 4)")
    p.add_argument("--layers", type=int, help="layers (default: as many as fit the colocated case)")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--batches", type=int, nargs="+", default=[96, 192, 384],
                   help="sequences per attention GPU (AFD) / per GPU (colocated) to sweep")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--routing", choices=["broadcast", "routed"], default="broadcast")
    p.add_argument("--channels", nargs="+", choices=["host", "stream"], default=["host"],
                   help="AFD channel protocols to run (each gets its own AFD row)")
    p.add_argument("--timeout", type=float, default=120.0, help="mesh timeout per run")
    p.add_argument("--out", default="bench_runtime.json")
    args = p.parse_args(argv)

    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        print("afdkit bench runtime: needs a host with 2 or more CUDA GPUs")
        return 2
    from afdkit.bench.common import environment
    from afdkit.runtime.config import RunConfig

    gpus = args.gpus or (4 if torch.cuda.device_count() >= 4 else 2)
    if gpus > torch.cuda.device_count():
        print(f"afdkit bench runtime: --gpus {gpus} but this host has {torch.cuda.device_count()}")
        return 2
    tops = args.topologies or (["2A2F"] if gpus >= 4 else ["1A1F"])
    gpu_bytes = torch.cuda.get_device_properties(0).total_memory
    layers = args.layers or auto_layers(gpu_bytes, max(args.batches), args.context, args.steps)
    env = environment()
    print(f"# {env.get('device')}  commit {env.get('commit')}  {env['date']}")
    print(f"# {gpus} GPUs, {layers} full-width layers, context {args.context}, batches {args.batches}", flush=True)
    base = RunConfig(model="full", layers=layers, context=args.context, steps=args.steps, device="cuda",
                     warmup_steps=args.warmup_steps, timeout_s=args.timeout, routing=args.routing, trace=True)
    results, rows = [], []
    for top in tops:
        m, n = (int(x) for x in top.upper().rstrip("F").split("A"))
        if m + n != gpus:
            print(f"skip {top}: needs {m + n} GPUs, the run uses {gpus}")
            continue
        for per in args.batches:
            plans = [dataclasses.replace(base, attention=m, ffn=n, batch=per * m, channel=ch) for ch in args.channels]
            plans.append(dataclasses.replace(base, attention=m, ffn=n, batch=per * gpus, colocated=True))
            for cfg in plans:
                print(f"-> {'colocated' if cfg.colocated else top} batch {cfg.batch} ...", flush=True)
                try:
                    res = _run(cfg)
                except Exception:  # noqa: BLE001 - one failed shape must not end the sweep
                    res = {"ok": False, "error": traceback.format_exc(), "config": cfg.to_dict()}
                results.append(res)
                if res["ok"]:
                    rows.append(_row(res, gpus))
                    r = rows[-1]
                    print(f"   TPOT {r['tpot_p50_ms']:.2f} ms ({r['tpot_per_layer_us']:.0f} us/layer), "
                          f"{r['tokens_per_s_per_gpu']:.0f} tok/s/GPU, 61-layer eq. "
                          f"{r['eq61_tokens_per_s_per_gpu']:.0f}", flush=True)
                else:
                    print(f"   failed: {res['error'].strip().splitlines()[-1][:300]}", flush=True)
    best: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["within_budget"] and r["tokens_per_s_per_gpu"] > best.get(r["mode"], {}).get("tokens_per_s_per_gpu", -1):
            best[r["mode"]] = r
    md = _markdown(rows, best, env)
    print(md)
    out = Path(args.out)
    out.write_text(json.dumps({"env": env, "layers": layers, "rows": rows, "best": best, "runs": results}, indent=1,
                              default=str))
    out.with_suffix(".md").write_text(md)
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
