"""The ``afdkit`` command line.

``afdkit demo``   the main job: until the AFD runtime lands, a colocated greedy decode of
                  the tiny Step-3 model with the reference implementation (CPU), timed.
``afdkit info``   build information of the native core (JSON).
``afdkit bench``  benchmarks of the parts that exist (``afdkit bench mfa``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence


def _cmd_info(args: argparse.Namespace) -> int:
    import afdkit

    print(json.dumps(afdkit.build_info(), indent=2))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from afdkit import reference
    from afdkit.models.step3 import Step3Config, Step3Weights

    config = Step3Config.tiny()
    weights = Step3Weights.random(config, seed=args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    prompt = torch.randint(0, config.vocab_size, (args.batch, args.prompt_len), generator=gen)
    kv_dtype = {"fp8": torch.float8_e4m3fn, "bf16": torch.bfloat16}[args.kv_dtype]
    print(
        f"afdkit demo: colocated reference decode of Step-3 tiny "
        f"({config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"{config.num_attention_heads} heads x {config.head_dim}, {config.moe_num_experts} experts top-{config.moe_top_k}), "
        f"batch {args.batch}, prompt {args.prompt_len}, {args.steps} steps, KV {args.kv_dtype}",
        flush=True,
    )
    t0 = time.perf_counter()
    tokens = reference.greedy_decode(config, weights, prompt, steps=args.steps, kv_dtype=kv_dtype)
    elapsed = time.perf_counter() - t0
    for b in range(min(args.batch, 4)):
        print(f"  seq {b}: {tokens[b].tolist()}")
    n = args.batch * args.steps
    print(f"{'mode':<12}{'tokens':>8}{'seconds':>10}{'tokens/s':>11}{'ms/step':>10}")
    print(f"{'colocated':<12}{n:>8}{elapsed:>10.2f}{n / elapsed:>11.1f}{1e3 * elapsed / args.steps:>10.1f}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    try:
        module = importlib.import_module(f"afdkit.bench.{args.part}")
    except ModuleNotFoundError:
        print(f"afdkit bench: no benchmark for '{args.part}' in this build", file=sys.stderr)
        return 2
    return int(module.main(args.rest) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="afdkit", description="Attention-FFN Disaggregation kit")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="print build information of the native core")
    info.set_defaults(func=_cmd_info)

    demo = sub.add_parser("demo", help="decode the tiny Step-3 model and print tokens and speed")
    demo.add_argument("--batch", type=int, default=4, help="sequences decoded together (default 4)")
    demo.add_argument("--prompt-len", type=int, default=8, help="prompt tokens per sequence (default 8)")
    demo.add_argument("--steps", type=int, default=16, help="tokens generated per sequence (default 16)")
    demo.add_argument("--kv-dtype", choices=["fp8", "bf16"], default="fp8", help="KV cache dtype (default fp8)")
    demo.add_argument("--seed", type=int, default=0, help="weights and prompt seed (default 0)")
    demo.set_defaults(func=_cmd_demo)

    bench = sub.add_parser("bench", help="run a part's benchmark (mfa)")
    bench.add_argument("part", choices=["mfa", "moe", "mesh"])
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    bench.set_defaults(func=_cmd_bench)
    return parser


def _positive(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("batch", "prompt_len", "steps"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _positive(parser, args)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
