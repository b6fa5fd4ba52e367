"""Per-stage timing of a worker: spans of (stage, layer, microbatch) and step ends.

Times are CLOCK_MONOTONIC nanoseconds (``time.monotonic_ns``), the clock the mesh
trace uses, so spans of all processes of one host and the mesh's message events line
up in one Chrome trace. On CUDA, compute stages are timed with CUDA events (device
time, no synchronisation while running) and placed on the host clock through one
calibration event recorded after a synchronisation; host-blocking stages (waiting for
a message) use the host clock directly.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch

# Stages: compute on the device, or the host blocked in a channel call.
DEVICE_STAGES = ("attention", "ffn", "sample")
HOST_STAGES = ("send", "wait", "recv", "send_back")


@dataclass
class Span:
    stage: str
    layer: int
    microbatch: int
    start_ns: int
    end_ns: int

    def as_tuple(self) -> tuple[str, int, int, int, int]:
        return (self.stage, self.layer, self.microbatch, self.start_ns, self.end_ns)


@dataclass
class StageRecorder:
    cuda: bool = False
    enabled: bool = True
    spans: list[Span] = field(default_factory=list)
    step_ends_ns: list[int] = field(default_factory=list)
    _events: list[tuple[str, int, int, object, object]] = field(default_factory=list)
    _base: tuple[object, int] | None = None

    def start(self) -> None:
        """Call once before the timed work (synchronises on CUDA for the calibration)."""
        if self.cuda:
            torch.cuda.synchronize()
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            ev.synchronize()
            self._base = (ev, time.monotonic_ns())

    @contextmanager
    def span(self, stage: str, layer: int, microbatch: int) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        if self.cuda and stage in DEVICE_STAGES:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            yield
            b.record()
            self._events.append((stage, layer, microbatch, a, b))
            return
        t0 = time.monotonic_ns()
        yield
        self.spans.append(Span(stage, layer, microbatch, t0, time.monotonic_ns()))

    def step_done(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()  # a token is out when the device finished it
        self.step_ends_ns.append(time.monotonic_ns())

    def resolve(self) -> list[Span]:
        """All spans on the host clock, by start time (resolves the CUDA events)."""
        if self._events:
            torch.cuda.synchronize()
            base_ev, base_ns = self._base  # type: ignore[misc]
            for stage, layer, mb, a, b in self._events:
                t0 = base_ns + int(base_ev.elapsed_time(a) * 1e6)  # type: ignore[attr-defined]
                t1 = base_ns + int(base_ev.elapsed_time(b) * 1e6)  # type: ignore[attr-defined]
                self.spans.append(Span(stage, layer, mb, t0, t1))
            self._events.clear()
        self.spans.sort(key=lambda s: s.start_ns)
        return self.spans


__all__ = ["Span", "StageRecorder", "DEVICE_STAGES", "HOST_STAGES"]
