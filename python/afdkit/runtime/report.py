"""Results of a run: throughput, TPOT, per-stage times, transfer share; table and traces.

Definitions (all over the timed steps, i.e. after ``warmup_steps``):

- tokens/s: sequences x timed steps / (last step end - end of the warmup), the step
  ends taken over all attention (or colocated) ranks; per GPU: divided by the number
  of processes (one GPU each with ``--device cuda``; on CPU, per process).
- TPOT: the time between consecutive step ends of an attention rank (every sequence
  gets one token per step), p50 and p99 over ranks and steps.
- per-stage time: mean duration of each stage per (layer, microbatch): ``attention``
  (attention half + router), ``send`` (quantize, pack, post), ``wait`` (attention
  blocked for the FFN result), ``ffn`` (FFN compute), ``recv`` (FFN blocked for
  rows), ``send_back``.
- transfer: one message's flight time (sender's enqueue to receiver's delivery, from
  the mesh trace) for A->F and F->A; transfer share = (A->F + F->A) / (A->F + F->A +
  attention + ffn): the part of one (layer, microbatch) round trip spent moving data.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from afdkit.runtime.config import RunConfig

STAGES = ("attention", "send", "wait", "ffn", "recv", "send_back", "sample")


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


@dataclass
class Summary:
    mode: str                 # "afd" or "colocated"
    topology: str             # e.g. "2A1F broadcast"
    processes: int
    tokens: int               # tokens generated in the timed steps
    seconds: float
    tokens_per_s: float
    tokens_per_s_per_gpu: float
    tpot_p50_ms: float
    tpot_p99_ms: float
    stage_us: dict[str, float] = field(default_factory=dict)
    a2f_us: float = float("nan")
    f2a_us: float = float("nan")
    transfer_share: float = float("nan")
    layers: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _timed_window(results: list[dict[str, Any]], warmup: int) -> tuple[int, int]:
    starts, ends = [], []
    for r in results:
        ends_ns = r["step_ends_ns"]
        if not ends_ns:
            continue
        starts.append(ends_ns[warmup - 1] if warmup > 0 else r.get("start_ns", ends_ns[0]))
        ends.append(ends_ns[-1])
    return (max(starts), max(ends)) if starts else (0, 0)


def summarize(cfg: RunConfig, results: dict[int, dict[str, Any]]) -> Summary:
    """The numbers of the table from every rank's result dict."""
    from afdkit.mesh.trace import message_spans

    drivers = [r for r in results.values() if r["role"] in ("attention", "colocated")]
    warm = cfg.warmup_steps
    t0, t1 = _timed_window(drivers, warm)
    timed_steps = cfg.steps - warm
    tokens = cfg.batch * timed_steps
    seconds = max((t1 - t0) / 1e9, 1e-9)
    tpots = [(b - a) / 1e6 for r in drivers for a, b in zip(r["step_ends_ns"][warm:], r["step_ends_ns"][warm + 1:])]
    if warm == 0:
        tpots += [(r["step_ends_ns"][0] - r.get("start_ns", r["step_ends_ns"][0])) / 1e6 for r in drivers]
    stage_durs: dict[str, list[float]] = {}
    for r in results.values():
        for stage, layer, mb, a, b in r["spans"]:
            if a >= t0:
                stage_durs.setdefault(stage, []).append((b - a) / 1e3)
    stage_us = {s: statistics.fmean(v) for s, v in stage_durs.items() if v}
    summary = Summary("colocated" if cfg.colocated else "afd", topology(cfg), cfg.world_size, tokens, seconds,
                      tokens / seconds, tokens / seconds / cfg.world_size, _pct(tpots, 0.5), _pct(tpots, 0.99),
                      stage_us, layers=cfg.model_config().num_hidden_layers)
    per_rank = {rank: r.get("mesh_events", []) for rank, r in results.items() if r.get("mesh_events")}
    if per_rank:
        a2f, f2a = [], []
        for s in message_spans(per_rank):
            if "delivered" in s and s["enqueue"] >= t0:
                (f2a if s["direction"] else a2f).append((s["delivered"] - s["enqueue"]) / 1e3)
        if a2f and f2a:
            summary.a2f_us, summary.f2a_us = statistics.fmean(a2f), statistics.fmean(f2a)
            moving = summary.a2f_us + summary.f2a_us
            busy = stage_us.get("attention", 0.0) + stage_us.get("ffn", 0.0)
            summary.transfer_share = moving / (moving + busy) if moving + busy > 0 else float("nan")
    return summary


def topology(cfg: RunConfig) -> str:
    if cfg.colocated:
        return f"{cfg.world_size}x colocated"
    return f"{cfg.attention}A{cfg.ffn}F {cfg.routing}"


def tokens_by_sequence(results: dict[int, dict[str, Any]]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for r in results.values():
        for sid, toks in zip(r.get("seq_ids", []), r.get("tokens", [])):
            out[sid] = list(toks)
    return out


def format_table(rows: list[Summary], per: str = "GPU") -> str:
    head = (f"{'mode':<10} {'topology':<20} {'tokens/s':>10} {'tok/s/' + per:>12} {'TPOT p50':>9} {'p99':>8} "
            f"{'attn us':>8} {'ffn us':>8} {'wait us':>8} {'A->F us':>8} {'F->A us':>8} {'xfer':>6}")
    lines = [head, "-" * len(head)]
    for s in rows:
        st = s.stage_us
        lines.append(
            f"{s.mode:<10} {s.topology:<20} {s.tokens_per_s:>10.1f} {s.tokens_per_s_per_gpu:>12.1f} "
            f"{s.tpot_p50_ms:>7.2f}ms {s.tpot_p99_ms:>6.2f}ms {st.get('attention', float('nan')):>8.0f} "
            f"{st.get('ffn', float('nan')):>8.0f} {st.get('wait', float('nan')):>8.0f} {s.a2f_us:>8.0f} "
            f"{s.f2a_us:>8.0f} {s.transfer_share:>6.0%}".replace("nan%", "   -").replace(" nan", "   -"))
    return "\n".join(lines)


# ---- traces -----------------------------------------------------------------------------------

_LANES = {"attention": 0, "sample": 0, "ffn": 0, "send": 1, "send_back": 1, "wait": 2, "recv": 2}
_LANE_NAMES = ("compute", "send", "blocked")


def chrome_trace(cfg: RunConfig, results: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Stages of every rank (one process row each, lanes compute/send/blocked) plus the
    mesh's messages with flow arrows; load in chrome://tracing or Perfetto."""
    from afdkit.mesh.trace import chrome_trace as mesh_trace

    events: list[dict[str, Any]] = []
    for rank, r in sorted(results.items()):
        events.append({"ph": "M", "name": "process_name", "pid": rank, "args": {"name": f"rank {rank} ({r['role']})"}})
        for lane, name in enumerate(_LANE_NAMES):
            events.append({"ph": "M", "name": "thread_name", "pid": rank, "tid": 1000 + lane,
                           "args": {"name": name}})
        for stage, layer, mb, a, b in r["spans"]:
            events.append({"ph": "X", "name": f"{stage} L{layer} mb{mb}", "cat": stage, "pid": rank,
                           "tid": 1000 + _LANES.get(stage, 0), "ts": a / 1e3, "dur": max(b - a, 1) / 1e3,
                           "args": {"layer": layer, "microbatch": mb}})
    per_rank = {rank: r.get("mesh_events", []) for rank, r in results.items() if r.get("mesh_events")}
    if per_rank:
        events += [e for e in mesh_trace(per_rank)["traceEvents"] if e.get("ph") != "M"]
    return {"traceEvents": events, "displayTimeUnit": "ns", "metadata": {"afdkit_run": cfg.to_dict()}}


def write_chrome_trace(path: str, cfg: RunConfig, results: dict[int, dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(chrome_trace(cfg, results), f)


def write_timeline_png(path: str, cfg: RunConfig, results: dict[int, dict[str, Any]]) -> str | None:
    """A picture of the stages of every rank over the last step. Returns None when
    written, else why not (matplotlib missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib); no timeline PNG written"
    drivers = [r for r in results.values() if r["step_ends_ns"] and r["role"] in ("attention", "colocated")]
    ends = sorted(r["step_ends_ns"] for r in drivers)[0] if drivers else []
    lo = ends[-2] if len(ends) >= 2 else min((s[3] for r in results.values() for s in r["spans"]), default=0)
    hi = max((r["step_ends_ns"][-1] for r in drivers), default=lo + 1)
    colors = {"attention": "tab:blue", "ffn": "tab:orange", "send": "tab:green", "send_back": "tab:green",
              "wait": "lightgray", "recv": "lightgray", "sample": "tab:purple"}
    ranks = sorted(results)
    fig, ax = plt.subplots(figsize=(12, 1.0 + 0.6 * len(ranks)))
    for row, rank in enumerate(ranks):
        for stage, layer, mb, a, b in results[rank]["spans"]:
            if b < lo or a > hi:
                continue
            ax.broken_barh([((a - lo) / 1e6, max(b - a, 1) / 1e6)], (row - 0.4, 0.8),
                           facecolors=colors.get(stage, "black"), edgecolor="white", linewidth=0.2,
                           alpha=0.55 + 0.15 * (mb % 3))
    ax.set_yticks(range(len(ranks)), [f"rank {r} ({results[r]['role']})" for r in ranks])
    ax.set_xlabel("ms into the last step")
    ax.set_title(f"afdkit {topology(cfg)}: {cfg.model} model, {cfg.model_config().num_hidden_layers} layers, "
                 f"batch {cfg.batch}, {cfg.microbatches} microbatches")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in ("tab:blue", "tab:orange", "tab:green", "lightgray")]
    ax.legend(handles, ["attention", "ffn", "send", "blocked"], loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


__all__ = ["Summary", "summarize", "format_table", "tokens_by_sequence", "chrome_trace", "write_chrome_trace",
           "write_timeline_png", "topology", "STAGES"]
