#!/usr/bin/env python3
"""A model checker for the synchronisation of the v5 MFA decode kernel (mfa-v5-consumer-v.patch).

A hang on the GPU costs a whole device call, so the v5 pipeline is first run here as a
set of actors over mbarrier-like objects with random interleavings and random copy
latencies:

- loader thread 0: issues the K and V copies of tile j + kAhead after converting K(j),
  waiting for the stage's previous readers (raw_k_empty / raw_v_empty) first; also a
  converter;
- loader thread 1: stands for the other 127 converter threads (no issuing);
- consumer 0 / 1: tile j belongs to consumer j % 2: wait V copy, convert V into its own
  V tile, release the V stage, wait k_full[c], QK^T (reads the K tile), release k_empty,
  PV (reads its V tile and the V scales of slot (j / 2) % 2); at each segment end the
  epilogue (max/sum parked in the V tile, read by the other consumer) and the barriers
  of the consumers' named barrier 2.

mbarrier semantics as on sm_90: a barrier completes a phase when its pending arrival
count reaches zero and its transaction bytes have landed; ``wait(parity)`` passes once
the phase of that parity has completed (a fresh barrier passes a wait on parity 1).
Every buffer carries a tag of what was last written to it, and every read checks it: a
reader that sees another tile's data, a copy landing in a stage still being read, or a
state in which no actor can move (a deadlock) fails the run.

    python3 dev/mfa/v5_pipeline_model.py [--runs N] [--mutate NAME]

``--mutate a,b`` breaks the design on purpose to show that the model catches it (the
run must then FAIL): no_k_empty_wait, single_v_scale_slot, issue_ahead_3, and
no_v_empty_wait,v_after_qk. (no_v_empty_wait alone passes: a consumer converts its V
before its QK^T, and the issuing step of tile t already waited, through k_empty, for the
QK^T of the tile whose V stage t reuses; the kernel keeps the wait as a guard. With the
V conversion moved after QK^T that implication is gone and the missing wait shows.)
"""

from __future__ import annotations

import argparse
import random
import sys
from dataclasses import dataclass, field


class ModelError(Exception):
    pass


@dataclass
class Barrier:
    """An mbarrier: `count` arrivals plus transaction bytes complete a phase (the v6
    model uses this one too)."""
    count: int
    name: str = ""
    pending: int = -1
    tx: int = 0
    phase: int = 0  # completed phases

    def __post_init__(self) -> None:
        self.pending = self.count

    def arrive(self, n: int = 1, expect_tx: int = 0) -> None:
        self.tx += expect_tx
        self.pending -= n
        if self.pending < 0:
            raise ModelError(f"more arrivals on {self.name or 'a barrier'} than its count in one phase")
        self._maybe_complete()

    def land(self, nbytes: int) -> None:
        self.tx -= nbytes
        self._maybe_complete()

    def _maybe_complete(self) -> None:
        if self.pending == 0 and self.tx == 0:
            self.phase += 1
            self.pending = self.count

    def passed(self, parity: int) -> bool:
        return (self.phase & 1) != parity


@dataclass
class Config:
    k_stages: int
    v_stages: int
    ahead: int
    segments: list[int]  # tiles per segment (0 = an empty sequence visited by the part)
    mutate: str = ""


@dataclass
class State:
    cfg: Config
    tiles: int
    raw_k: list = field(default_factory=list)
    raw_v: list = field(default_factory=list)
    k_op: object = None
    v_op: list = field(default_factory=lambda: [None, None])
    v_scale: dict = field(default_factory=dict)
    in_flight: list = field(default_factory=list)  # (ring, stage, tag, barrier)
    reading: set = field(default_factory=set)      # (ring, stage) being read right now
    bars: dict = field(default_factory=dict)
    named: dict = field(default_factory=dict)      # consumers' named barrier: arrivals per generation


def make_state(cfg: Config) -> State:
    st = State(cfg, tiles=sum(cfg.segments))
    st.raw_k = [None] * cfg.k_stages
    st.raw_v = [None] * cfg.v_stages
    b = st.bars
    for s in range(cfg.k_stages):
        b[("raw_k_full", s)] = Barrier(1)
        b[("raw_k_empty", s)] = Barrier(2)  # both loader actors
    for s in range(cfg.v_stages):
        b[("raw_v_full", s)] = Barrier(1)
        b[("raw_v_empty", s)] = Barrier(1)  # the tile's consumer
    b["k_empty"] = Barrier(1)
    for c in range(2):
        b[("k_full", c)] = Barrier(2)
    return st


def wait(st: State, name, parity: int):
    bar = st.bars[name]
    if not bar.passed(parity):
        yield ("wait", lambda: bar.passed(parity), f"wait {name} parity {parity}")


def issue_tile(st: State, t: int):
    cfg = st.cfg
    ks, vs = t % cfg.k_stages, t % cfg.v_stages
    if t >= cfg.k_stages:
        yield from wait(st, ("raw_k_empty", ks), ((t // cfg.k_stages) & 1) ^ 1)
    st.bars[("raw_k_full", ks)].arrive(expect_tx=1)
    st.in_flight.append(("k", ks, ("K", t), ("raw_k_full", ks)))
    if t >= cfg.v_stages and "no_v_empty_wait" not in cfg.mutate:
        yield from wait(st, ("raw_v_empty", vs), ((t // cfg.v_stages) & 1) ^ 1)
    st.bars[("raw_v_full", vs)].arrive(expect_tx=1)
    st.in_flight.append(("v", vs, ("V", t), ("raw_v_full", vs)))


def read_raw(st: State, ring: str, stage: int, expect):
    buf = st.raw_k if ring == "k" else st.raw_v
    if buf[stage] != expect:
        raise ModelError(f"raw_{ring}[{stage}] holds {buf[stage]} where {expect} was expected")
    st.reading.add((ring, stage))
    yield ("step",)
    st.reading.discard((ring, stage))
    if buf[stage] != expect:
        raise ModelError(f"raw_{ring}[{stage}] changed to {buf[stage]} while {expect} was read")


def loader(st: State, issuer: bool):
    cfg = st.cfg
    issued = 0
    if issuer:
        while issued < min(cfg.ahead, st.tiles):
            yield from issue_tile(st, issued)
            issued += 1
    for j in range(st.tiles):
        ks, c = j % cfg.k_stages, j & 1
        yield from wait(st, ("raw_k_full", ks), (j // cfg.k_stages) & 1)
        if "no_k_empty_wait" not in cfg.mutate:
            yield from wait(st, "k_empty", (j & 1) ^ 1)
        yield from read_raw(st, "k", ks, ("K", j))
        st.k_op = ("K", j)
        if not issuer:  # threads 64..127 store the V scales of the tile's consumer
            slot = 0 if "single_v_scale_slot" in cfg.mutate else (j >> 1) & 1
            st.v_scale[(c, slot)] = j
        st.bars[("k_full", c)].arrive()
        st.bars[("raw_k_empty", ks)].arrive()
        if issuer and issued < st.tiles:
            yield from issue_tile(st, issued)
            issued += 1
        yield ("step",)


def named_bar(st: State, key: str):
    st.named[key] = st.named.get(key, 0) + 1
    if st.named[key] < 2:
        yield ("wait", lambda: st.named[key] >= 2, f"named barrier {key}")


def convert_v(st: State, c: int, j: int):
    vs = j % st.cfg.v_stages
    yield from wait(st, ("raw_v_full", vs), (j // st.cfg.v_stages) & 1)
    yield from read_raw(st, "v", vs, ("V", j))
    st.v_op[c] = ("V", j)
    st.bars[("raw_v_empty", vs)].arrive()


def consumer(st: State, c: int):
    cfg = st.cfg
    j = 0
    for seg_i, n in enumerate(cfg.segments):
        yield from named_bar(st, f"top{seg_i}a")
        yield from named_bar(st, f"top{seg_i}b")
        for _ in range(n):
            if (j & 1) == c:
                late_v = "v_after_qk" in cfg.mutate
                if not late_v:
                    yield from convert_v(st, c, j)
                yield from wait(st, ("k_full", c), (j >> 1) & 1)
                if st.k_op != ("K", j):
                    raise ModelError(f"consumer {c} QK of tile {j} reads {st.k_op}")
                yield ("step",)
                if st.k_op != ("K", j):
                    raise ModelError(f"K tile overwritten during consumer {c}'s QK of tile {j}")
                st.bars["k_empty"].arrive()
                if late_v:
                    yield from convert_v(st, c, j)
                yield ("step",)
                slot = 0 if "single_v_scale_slot" in cfg.mutate else (j >> 1) & 1
                if st.v_scale.get((c, slot)) != j:
                    raise ModelError(f"consumer {c} tile {j} reads V scales of tile {st.v_scale.get((c, slot))}")
                if st.v_op[c] != ("V", j):
                    raise ModelError(f"consumer {c} PV of tile {j} reads {st.v_op[c]}")
                yield ("step",)
            j += 1
        st.v_op[c] = ("ml", seg_i)  # epilogue: (max, sum) parked in the own V tile
        yield from named_bar(st, f"epi{seg_i}a")
        if st.v_op[c ^ 1] != ("ml", seg_i):
            raise ModelError(f"consumer {c} reads the other's (max, sum) as {st.v_op[c ^ 1]} in segment {seg_i}")
        yield from named_bar(st, f"epi{seg_i}b")


def land_one(st: State, rng: random.Random) -> None:
    i = rng.randrange(len(st.in_flight))
    ring, stage, tag, bar = st.in_flight.pop(i)
    if (ring, stage) in st.reading:
        raise ModelError(f"a copy landed in raw_{ring}[{stage}] while it was being read")
    (st.raw_k if ring == "k" else st.raw_v)[stage] = tag
    st.bars[bar].land(1)


def run_once(cfg: Config, rng: random.Random) -> None:
    st = make_state(cfg)
    actors = {"loader0": loader(st, True), "loader1": loader(st, False),
              "cons0": consumer(st, 0), "cons1": consumer(st, 1)}
    waiting: dict[str, tuple] = {}  # actor -> (predicate, description) it is blocked on
    while actors:
        runnable = [a for a in actors if a not in waiting or waiting[a][0]()]
        if st.in_flight:
            runnable += ["copy"] * 2  # copies land at random times
        if not runnable:
            raise ModelError("deadlock: " + "; ".join(f"{a}: {waiting[a][1]}" for a in actors))
        name = rng.choice(runnable)
        if name == "copy":
            land_one(st, rng)
            continue
        step_actor(actors, waiting, name)
    if st.in_flight:
        raise ModelError("copies left in flight at the end")


def step_actor(actors: dict, waiting: dict, name: str) -> None:
    """Runs actor `name` to its next event: gone when it finishes, or waiting on a predicate."""
    waiting.pop(name, None)
    try:
        ev = next(actors[name])
    except StopIteration:
        del actors[name]
        return
    if ev[0] == "wait":
        waiting[name] = (ev[1], ev[2])


def random_config(rng: random.Random, mutate: str) -> Config:
    kind = rng.choice(["fp8", "bf16"])
    k_stages, v_stages = (3, 3) if kind == "fp8" else (1, 2)
    ahead = max(k_stages - 1, 1)
    if "issue_ahead_3" in mutate:
        ahead = 3 if kind == "fp8" else 2
    segments = [rng.choice([0, 1, 1, 2, 3, 5, 8, 13]) for _ in range(rng.randint(1, 4))]
    return Config(k_stages, v_stages, ahead, segments, mutate)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--mutate", default="")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    failures = 0
    first = None
    for i in range(args.runs):
        cfg = random_config(rng, args.mutate)
        try:
            run_once(cfg, rng)
        except ModelError as e:
            failures += 1
            first = first or f"run {i} {cfg}: {e}"
    print(f"{args.runs} random schedules, mutation '{args.mutate or 'none'}': {failures} failed")
    if first:
        print("first failure:", first)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
