"""The ``afdkit`` command line.

``afdkit demo``   the main job: the tiny Step-3 model decoded by AFD (2 attention + 1 FFN
                  processes; over UCX shared memory on CPU, one GPU each with GPUs),
                  tokens checked against the colocated reference, results table.
``afdkit run``    any AFD (or colocated) run: ``--attention M --ffn N --model {tiny,full}
                  --layers L --batch B --context C --steps S [--device cpu|cuda]``;
                  under torchrun (RANK/WORLD_SIZE set) this process is one rank.
``afdkit info``   build information of the native core (JSON).
``afdkit bench``  benchmarks: ``mfa``, ``moe``, ``mesh``, ``runtime``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence


def _cmd_info(args: argparse.Namespace) -> int:
    import afdkit

    print(json.dumps(afdkit.build_info(), indent=2))
    return 0


# ---- run / demo -------------------------------------------------------------------------------


def _run_config(args: argparse.Namespace, **override: Any) -> Any:
    from afdkit.runtime.config import RunConfig

    fields = dict(attention=args.attention, ffn=args.ffn, model=args.model, layers=args.layers, batch=args.batch,
                  context=args.context, steps=args.steps, microbatches=args.microbatches, routing=args.routing,
                  device=args.device, colocated=getattr(args, "colocated", False), seed=args.seed,
                  checkpoint=getattr(args, "checkpoint", None), warmup_steps=args.warmup_steps,
                  timeout_s=args.timeout, transport=args.transport, trace=not getattr(args, "no_trace", False),
                  channel=getattr(args, "channel", "host"))
    fields.update(override)
    return RunConfig(**fields)


def _execute(cfg: Any, label: str, quiet: bool = False) -> Any:
    """Runs ``cfg`` locally or as this torchrun rank; returns the outcome (or None
    on a non-zero torchrun rank, which has nothing to report)."""
    from afdkit.runtime.launch import launch_local, launch_torchrun, torchrun_env
    from afdkit.runtime.progress import ProgressBar

    env = torchrun_env()
    drivers = cfg.world_size if cfg.colocated else cfg.attention
    bar = ProgressBar(f"{label}", total=cfg.steps, quiet=quiet or (env is not None and env["rank"] != 0))
    done: dict[int, int] = {}

    def on_step(rank: int, step: int) -> None:
        if cfg.colocated or rank < cfg.attention:
            done[rank] = step + 1
            if len(done) == drivers:
                bar.update(min(done.values()))

    def on_start(pids: dict[int, int]) -> None:
        roles = ["colocated" if cfg.colocated else cfg.role(r) for r in sorted(pids)]
        print(f"{label}: " + ", ".join(f"rank {r} ({role}) pid {pids[r]}" for r, role in zip(sorted(pids), roles)),
              flush=True)

    try:
        if env is not None:
            outcome = launch_torchrun(cfg, env, on_step)
            if env["rank"] != 0:
                return None
        else:
            outcome = launch_local(cfg, on_start, on_step)
    finally:
        bar.close()
    return outcome


def _report(outcomes: list[Any], out_dir: str | None, json_path: str | None, device: str) -> list[Any]:
    from afdkit.runtime import report

    summaries = [report.summarize(o.config, o.results) for o in outcomes]
    print(report.format_table(summaries, per="GPU" if device == "cuda" else "proc"))
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        for o in outcomes:
            stem = "colocated" if o.config.colocated else "afd"
            trace = os.path.join(out_dir, f"{stem}-trace.json")
            report.write_chrome_trace(trace, o.config, o.results)
            png = os.path.join(out_dir, f"{stem}-timeline.png")
            why = report.write_timeline_png(png, o.config, o.results)
            print(f"  {stem}: Chrome trace {trace}; " + (f"timeline {png}" if why is None else why))
    if json_path:
        payload = {"rows": [s.as_dict() for s in summaries], "configs": [o.config.to_dict() for o in outcomes]}
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=1)
    return summaries


def _check_tokens(cfg: Any, outcome: Any) -> bool:
    """Compares the AFD run's tokens with the in-process colocated reference: exactly
    on CPU (float64 between the quantization points makes rows batch-independent); on
    GPUs at least 90% (cuBLAS may round a row differently at another batch size, which
    can flip a near-tie)."""
    from afdkit.runtime import report
    from afdkit.runtime.rank import reference_tokens

    got = report.tokens_by_sequence(outcome.results)
    want = reference_tokens(cfg, device="cuda:0" if cfg.device == "cuda" else "cpu")
    bad = [s for s in sorted(want) if got.get(s) != want[s]]
    total = sum(len(t) for t in want.values())
    same = sum(a == b for s in want for a, b in zip(got.get(s, []), want[s]))
    if not bad:
        print(f"check: the greedy tokens of all {len(want)} sequences equal the colocated reference "
              f"(same weights, same wire numerics)")
        return True
    s = bad[0]
    detail = f"sequence {s}: AFD {got.get(s)} vs colocated {want[s]}"
    if cfg.device == "cuda" and same >= 0.9 * total:
        print(f"check: {same} of {total} greedy tokens equal the colocated reference (GPU rounding; first "
              f"difference in {detail})")
        return True
    print(f"CHECK FAILED: {len(bad)} of {len(want)} sequences differ from the colocated reference "
          f"({same} of {total} tokens equal); {detail}")
    return False


def _print_tokens(outcome: Any, limit: int = 4) -> None:
    from afdkit.runtime import report

    toks = report.tokens_by_sequence(outcome.results)
    for sid in sorted(toks)[:limit]:
        print(f"  seq {sid}: {toks[sid]}")


def _cmd_run(args: argparse.Namespace) -> int:
    cfg = _run_config(args)
    outcome = _execute(cfg, "afdkit run" + (" (colocated)" if cfg.colocated else ""))
    if outcome is None:
        return 0
    if not outcome.ok:
        print(outcome.failure_message(), file=sys.stderr)
        return 130 if outcome.interrupted else 1
    outcomes = [outcome]
    if args.compare and not cfg.colocated:
        base = _execute(_run_config(args, colocated=True), "afdkit run (colocated baseline)")
        if base is None or not base.ok:
            print(base.failure_message() if base else "colocated baseline failed", file=sys.stderr)
            return 1
        outcomes.append(base)
    _print_tokens(outcome)
    _report(outcomes, args.out, args.json, cfg.device)
    if args.check and not cfg.colocated and not _check_tokens(cfg, outcome):
        return 1
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import torch

    device = args.device
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device == "auto":
        device = "cuda" if gpus >= 2 else "cpu"
    args.device = device
    # 2 attention + 1 FFN processes; on a host with just 2 GPUs, 1 + 1.
    attention = 1 if device == "cuda" and gpus == 2 else 2
    shape = dict(context=args.prompt_len, attention=attention, ffn=1, model="tiny", layers=None)
    cfg = _run_config(args, colocated=False, **shape)
    c = cfg.model_config()
    where = "one GPU per process" if device == "cuda" else "CPU, UCX shared memory"
    print(f"afdkit demo: AFD decode of Step-3 tiny ({c.num_hidden_layers} layers, hidden {c.hidden_size}, "
          f"{c.num_attention_heads} heads x {c.head_dim}, {c.moe_num_experts} experts top-{c.moe_top_k}) "
          f"with {attention} attention + 1 FFN processes ({where}); batch {cfg.batch}, context {cfg.context}, "
          f"{cfg.steps} steps, {cfg.microbatches} microbatches, KV {args.kv_dtype}", flush=True)
    outcome = _execute(cfg, "afdkit demo")
    if outcome is None:
        return 0
    if not outcome.ok:
        print(outcome.failure_message(), file=sys.stderr)
        return 130 if outcome.interrupted else 1
    outcomes = [outcome]
    if not args.no_compare:
        base = _execute(_run_config(args, colocated=True, **shape), "afdkit demo (colocated baseline)")
        if base is None or not base.ok:
            print(base.failure_message() if base else "colocated baseline failed", file=sys.stderr)
            return 1
        outcomes.append(base)
    _print_tokens(outcome)
    out_dir = args.out or tempfile.mkdtemp(prefix="afdkit-demo-")
    _report(outcomes, out_dir, args.json, device)
    return 0 if _check_tokens(cfg, outcome) else 1


# ---- bench ------------------------------------------------------------------------------------


def _repo_bench_script(part: str) -> Path | None:
    """``bench/bench_<part>.py`` of a source checkout (the current directory or the one
    this package was installed from), for benchmarks that live outside the package."""
    candidates = [Path.cwd(), Path(__file__).resolve().parents[2]]
    for root in candidates:
        p = root / "bench" / f"bench_{part}.py"
        if p.is_file():
            return p
    return None


def _cmd_bench(args: argparse.Namespace) -> int:
    import importlib
    import runpy

    try:
        module = importlib.import_module(f"afdkit.bench.{args.part}")
    except ModuleNotFoundError:
        module = None
    if module is not None and hasattr(module, "main"):
        return int(module.main(args.rest) or 0)
    script = _repo_bench_script(args.part)
    if script is None:
        print(f"afdkit bench: the '{args.part}' benchmark is bench/bench_{args.part}.py of a source checkout; "
              "run this command from the repository root", file=sys.stderr)
        return 2
    saved = sys.argv
    sys.argv = [str(script), *args.rest]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    finally:
        sys.argv = saved
    return 0


# ---- parser -----------------------------------------------------------------------------------


def _add_run_shape(p: argparse.ArgumentParser, *, batch: int, context: int, steps: int) -> None:
    p.add_argument("--batch", type=int, default=batch, help=f"sequences decoded together (default {batch})")
    p.add_argument("--steps", type=int, default=steps, help=f"tokens generated per sequence (default {steps})")
    p.add_argument("--microbatches", type=int, default=3, help="microbatches in flight per attention worker (3)")
    p.add_argument("--routing", choices=["broadcast", "routed"], default="broadcast",
                   help="FFN split: broadcast = tensor parallel, routed = expert parallel (default broadcast)")
    p.add_argument("--seed", type=int, default=0, help="weights, context and first tokens seed (default 0)")
    p.add_argument("--warmup-steps", type=int, default=1, help="steps left out of the statistics (default 1)")
    p.add_argument("--timeout", type=float, default=30.0, help="mesh timeout in seconds (default 30)")
    p.add_argument("--transport", choices=["shm", "tcp", "auto"], default="shm",
                   help="UCX transport of local CPU runs (default shm; UCX_TLS in the environment wins)")
    p.add_argument("--out", help="folder for the Chrome trace and the timeline PNG")
    p.add_argument("--json", help="write the results table as JSON here")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="afdkit", description="Attention-FFN Disaggregation kit")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="print build information of the native core")
    info.set_defaults(func=_cmd_info)

    demo = sub.add_parser("demo", help="AFD decode of the tiny Step-3 model, checked against the colocated model")
    _add_run_shape(demo, batch=6, context=8, steps=8)
    demo.add_argument("--prompt-len", "--context", dest="prompt_len", type=int, default=8,
                      help="tokens cached per sequence before decoding (default 8)")
    demo.add_argument("--kv-dtype", choices=["fp8"], default="fp8", help="KV cache dtype (fp8)")
    demo.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                      help="auto: one GPU per process when the host has 2 or more, else CPU")
    demo.add_argument("--no-compare", action="store_true", help="skip the colocated baseline run")
    demo.set_defaults(func=_cmd_demo, attention=2, ffn=1, model="tiny", layers=None, context=8)

    run = sub.add_parser("run", help="an AFD (or colocated) decode run with a results table and traces")
    run.add_argument("--attention", type=int, required=True, help="attention processes (M)")
    run.add_argument("--ffn", type=int, required=True, help="FFN processes (N)")
    run.add_argument("--model", choices=["tiny", "full"], default="tiny", help="Step-3 widths (default tiny)")
    run.add_argument("--layers", type=int, help="layers to run (default: all of the model)")
    run.add_argument("--context", type=int, default=16, help="tokens cached per sequence (default 16)")
    _add_run_shape(run, batch=6, context=16, steps=8)
    run.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cpu, or one GPU per process")
    run.add_argument("--colocated", action="store_true", help="run the colocated baseline instead of AFD")
    run.add_argument("--compare", action="store_true", help="also run the colocated baseline on as many processes")
    run.add_argument("--check", action="store_true", help="compare the tokens with the in-process colocated model")
    run.add_argument("--checkpoint", help="safetensors file or folder with Step-3 tensor names")
    run.add_argument("--no-trace", action="store_true", help="no mesh message tracing")
    run.add_argument("--channel", choices=["host", "stream"], default="host",
                     help="GPU AFD channel: host-waited (default) or stream-ordered (GPUs of one host)")
    run.set_defaults(func=_cmd_run)

    bench = sub.add_parser("bench", help="run a part's benchmark (mfa, moe, mesh, runtime)")
    bench.add_argument("part", choices=["mfa", "moe", "mesh", "runtime"])
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    bench.set_defaults(func=_cmd_bench)
    return parser


def _validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("batch", "prompt_len", "steps", "microbatches"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.command in ("run", "demo"):
        demo = args.command == "demo"
        overrides = dict(context=args.prompt_len, attention=2, ffn=1, model="tiny", layers=None) if demo else {}
        if demo and args.device == "auto":
            overrides["device"] = "cpu"
        try:
            _run_config(args, **overrides).validate()
        except ValueError as exc:
            parser.error(str(exc))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _validate(parser, args)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
