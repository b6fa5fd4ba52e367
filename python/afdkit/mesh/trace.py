"""Per-message timestamps of the mesh, and their export as a Chrome trace.

Every traced put records ``enqueue`` (the call), ``posted`` (handed to UCX or the copy
engine) and ``completed`` (source reusable) on the sender; the receiver records
``delivered`` (its wait saw the signal) and ``consumed`` (it copied the rows out and
released the slot). Times are CLOCK_MONOTONIC ns (``time.monotonic_ns()``), so the
events of all processes of one host line up; across hosts they need a clock offset.

Open the output of :func:`write_chrome_trace` in ``chrome://tracing`` or Perfetto:
one process row per rank, one thread row per peer, flow arrows from send to receive.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable, Mapping

KINDS = ("enqueue", "posted", "completed", "delivered", "consumed")


@dataclass(frozen=True)
class TraceEvent:
    rank: int
    tag: int
    t_ns: int
    nbytes: int
    peer: int
    kind: str


def decode_tag(tag: int) -> dict[str, int]:
    """The fields of an AFD channel tag (see ``afdkit.mesh.channel.tag_of``)."""
    return {"direction": (tag >> 62) & 1, "layer": (tag >> 40) & 0xFFFFF, "microbatch": (tag >> 32) & 0xFF,
            "src": (tag >> 16) & 0xFFFF, "dst": tag & 0xFFFF}


def events(rank: int, raw: Iterable[tuple[int, int, int, int, int]]) -> list[TraceEvent]:
    """Raw engine tuples (``Mesh.trace_events()``) of one rank as TraceEvents."""
    return [TraceEvent(rank, tag, t, nb, peer, KINDS[kind]) for tag, t, nb, peer, kind in raw]


def message_spans(per_rank: Mapping[int, Iterable[tuple[int, int, int, int, int]]]) -> list[dict[str, int]]:
    """Joins both ends of every message: one dict per (tag, occurrence) with the five
    timestamps (missing ones absent), src, dst, layer, microbatch and bytes."""
    by_tag: dict[tuple[int, str], list[TraceEvent]] = {}
    for rank, raw in per_rank.items():
        for e in events(rank, raw):
            by_tag.setdefault((e.tag, e.kind), []).append(e)
    spans = []
    for (tag, kind), evs in by_tag.items():
        if kind != "enqueue":
            continue
        for i, e in enumerate(sorted(evs, key=lambda x: x.t_ns)):
            span = {"tag": tag, **decode_tag(tag), "nbytes": e.nbytes, "enqueue": e.t_ns}
            for other in KINDS[1:]:
                matches = sorted(by_tag.get((tag, other), []), key=lambda x: x.t_ns)
                if i < len(matches):
                    span[other] = matches[i].t_ns
            spans.append(span)
    return sorted(spans, key=lambda s: s["enqueue"])


def chrome_trace(per_rank: Mapping[int, Iterable[tuple[int, int, int, int, int]]],
                 roles: Mapping[int, str] | None = None) -> dict:
    """A Chrome trace (JSON object format) of the messages of all ranks."""
    out: list[dict] = []
    for rank in per_rank:
        label = f"rank {rank}" + (f" ({roles[rank]})" if roles and rank in roles else "")
        out.append({"ph": "M", "name": "process_name", "pid": rank, "args": {"name": label}})
    for i, s in enumerate(message_spans(per_rank)):
        name = f"{'A->F' if s['direction'] == 0 else 'F->A'} L{s['layer']} mb{s['microbatch']}"
        args = {"bytes": s["nbytes"], "src": s["src"], "dst": s["dst"]}
        end = s.get("completed", s.get("posted", s["enqueue"]))
        out.append({"ph": "X", "name": f"send {name}", "pid": s["src"], "tid": s["dst"], "ts": s["enqueue"] / 1e3,
                    "dur": max(end - s["enqueue"], 1) / 1e3, "args": args})
        if "delivered" in s:
            out.append({"ph": "s", "id": i, "name": name, "cat": "mesh", "pid": s["src"], "tid": s["dst"],
                        "ts": s["enqueue"] / 1e3})
            fin = s.get("consumed", s["delivered"])
            out.append({"ph": "X", "name": f"recv {name}", "pid": s["dst"], "tid": s["src"],
                        "ts": s["delivered"] / 1e3, "dur": max(fin - s["delivered"], 1) / 1e3,
                        "args": {**args, "latency_us": (s["delivered"] - s["enqueue"]) / 1e3}})
            out.append({"ph": "f", "bp": "e", "id": i, "name": name, "cat": "mesh", "pid": s["dst"],
                        "tid": s["src"], "ts": s["delivered"] / 1e3})
    return {"traceEvents": out, "displayTimeUnit": "ns"}


def write_chrome_trace(path: str, per_rank: Mapping[int, Iterable[tuple[int, int, int, int, int]]],
                       roles: Mapping[int, str] | None = None) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(chrome_trace(per_rank, roles), f)


__all__ = ["TraceEvent", "KINDS", "events", "decode_tag", "message_spans", "chrome_trace", "write_chrome_trace"]
