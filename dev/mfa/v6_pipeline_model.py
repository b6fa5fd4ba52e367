#!/usr/bin/env python3
"""A model checker for the synchronisation of the v6 MFA decode kernel (default loader).

The v6 pipeline (csrc/mfa/sm90_loader.cuh, sm90_kernel.cuh, config.h) run as actors over
mbarrier-like objects, with random interleavings and random copy latencies:

- the loader's issuing warp (lane 0 issues), per tile t: waits raw_k_empty[t % KS]
  (t >= KS); with per-token scales stores its K scale and arrives on raw_k_full;
  arrive_expect_tx on raw_k_full and the K copy of tile t; waits raw_v_empty[t % VS]
  (t >= VS); arrive_expect_tx on raw_v_full and the V copy. A copy lands as 1..3
  pieces (pages / column blocks) at random times;
- per-token scales only: the other 127 loader threads, as two actors (threads 1..63
  store k_scale[t % KS], threads 64..127 v_scale[t % (KS + 2)]), each waiting
  raw_k_empty[t % KS] and then arriving on raw_k_full[t % KS] (count 1 + 128);
- consumer 0 / 1: tile j (counted over the part's segments) belongs to consumer j % 2:
  wait raw_v_full, convert raw V into v_op[c], release the V stage (128 arrivals); wait
  raw_k_full, QK^T (K stage, Q), K scales, release the K stage (4 warps); softmax
  (row_mult); PV (V scales of slot j % (KS + 2), v_op[c]). Per segment: named barrier,
  Q + row_mult stored (every segment), named barrier, tiles, epilogue ((max, sum)
  through row_ml, O through the Q tile, three named barriers). All named barriers are
  barrier 2 of both consumers, matched by call count as on the GPU.

mbarrier semantics as on sm_90: a phase completes when the pending arrivals reach zero and
the expected transaction bytes have landed; wait(parity) passes once the phase of that
parity has completed (a fresh barrier passes parity 1). Every buffer carries a tag of what
was last written to it; every read checks it at its start and end, and a write (or a copy
landing) into a buffer being read fails the run, as does a state in which no actor can
move (deadlock) or more arrivals than a barrier's count in one phase.

Configurations: fp8 (KS, VS) = (3, 4), bf16 (2, 2), per-tensor or per-token scales.
bf16 with per-token scales is not instantiated by the kernel (per_token_scales is fp8
only); it is checked as a stricter ring shape (KS = 2).

    python3 dev/mfa/v6_pipeline_model.py [--runs N] [--seed S] [--config NAME] [--mutate NAME]

``--mutate a,b`` breaks the design on purpose (the run must then FAIL):
few_v_scale_slots (KS V-scale slots instead of KS + 2), no_k_empty_wait (the loader
threads skip the raw_k_empty wait), early_k_release (a consumer releases the K stage
before it reads k_scale). no_v_empty_wait alone passes: thread 0 issuing tile t has waited
raw_k_empty of tile t - 1 - KS, whose QK^T came after the V conversion of every tile up to
t - 1 - KS >= t - VS of its consumer (VS >= KS + 1 for fp8; for bf16 the wait of tile t
itself covers tile t - 2); the kernel keeps that wait as a guard.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path


def _load_v5_model():
    """The v5 model's barrier and error types and actor stepping (dev/mfa/v5_pipeline_model.py), shared."""
    path = Path(__file__).resolve().parent / "v5_pipeline_model.py"
    spec = importlib.util.spec_from_file_location("mfa_v5_pipeline_model_shared", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve the module by name
    spec.loader.exec_module(mod)
    return mod


_v5 = _load_v5_model()
Barrier, ModelError = _v5.Barrier, _v5.ModelError

CONFIGS = {"fp8-tensor": (3, 4, False), "fp8-token": (3, 4, True),
           "bf16-tensor": (2, 2, False), "bf16-token": (2, 2, True)}
MUTATIONS = ("few_v_scale_slots", "no_k_empty_wait", "early_k_release", "no_v_empty_wait")


@dataclass
class Config:
    name: str
    k_stages: int
    v_stages: int
    per_token: bool
    segments: list[int]  # tiles per segment (0 = an empty sequence visited by the part)
    mutate: str = ""

    @property
    def v_slots(self) -> int:
        return self.k_stages if "few_v_scale_slots" in self.mutate else self.k_stages + 2


@dataclass
class State:
    cfg: Config
    tiles: int
    mem: dict = field(default_factory=dict)        # buffer -> tag of its last write
    reading: dict = field(default_factory=dict)    # buffer -> readers right now
    in_flight: list = field(default_factory=list)  # [buffer, tag, barrier, pieces left to land]
    landing: dict = field(default_factory=dict)    # buffer -> pieces of its copy still to land
    bars: dict = field(default_factory=dict)
    named_calls: list = field(default_factory=lambda: [0, 0])  # named barrier 2, per consumer
    named_arrivals: dict = field(default_factory=dict)         # generation -> consumers arrived


def make_state(cfg: Config) -> State:
    st = State(cfg, tiles=sum(cfg.segments))
    for s in range(cfg.k_stages):
        st.bars[("raw_k_full", s)] = Barrier(1 + (128 if cfg.per_token else 0), f"raw_k_full[{s}]")
        st.bars[("raw_k_empty", s)] = Barrier(4, f"raw_k_empty[{s}]")  # the tile's consumer's 4 warps
    for s in range(cfg.v_stages):
        st.bars[("raw_v_full", s)] = Barrier(1, f"raw_v_full[{s}]")
        st.bars[("raw_v_empty", s)] = Barrier(128, f"raw_v_empty[{s}]")  # its 128 threads
    return st


def wait(st: State, name, parity: int):
    bar = st.bars[name]
    if not bar.passed(parity):
        yield ("wait", lambda: bar.passed(parity), f"wait {name} parity {parity}")


def write(st: State, buf, tag) -> None:
    if st.reading.get(buf):
        raise ModelError(f"{buf} rewritten with {tag} while {st.mem.get(buf)} was being read")
    if buf in st.landing:
        raise ModelError(f"{buf} written while a copy is landing in it")
    st.mem[buf] = tag


def read(st: State, what: str, expect: dict):
    """Reads the buffers in `expect` (buffer -> tag) over one scheduling step."""
    for when in ("start", "end"):
        for buf, tag in expect.items():
            if st.mem.get(buf) != tag:
                raise ModelError(f"{what}: {buf} holds {st.mem.get(buf)} at the {when} of the read, "
                                 f"{tag} expected")
        if when == "start":
            for buf in expect:
                st.reading[buf] = st.reading.get(buf, 0) + 1
            yield ("step",)
            for buf in expect:
                st.reading[buf] -= 1


def issue(st: State, rng: random.Random, ring: str, stage: int, t: int) -> None:
    buf, bar = (f"raw_{ring}", stage), (f"raw_{ring}_full", stage)
    if buf in st.landing:
        raise ModelError(f"copy of {ring.upper()}({t}) issued into {buf} while another copy lands there")
    pieces = rng.randint(1, 3)
    st.bars[bar].arrive(expect_tx=pieces)
    st.landing[buf] = pieces
    st.in_flight.append([buf, (ring.upper(), t), bar, pieces])


def loader0(st: State, rng: random.Random):
    cfg = st.cfg
    for t in range(st.tiles):
        ks, vs = t % cfg.k_stages, t % cfg.v_stages
        if t >= cfg.k_stages and "no_k_empty_wait" not in cfg.mutate:
            yield from wait(st, ("raw_k_empty", ks), ((t // cfg.k_stages) & 1) ^ 1)
        if cfg.per_token:
            write(st, ("k_scale", ks, 0), ("ks", t))  # thread 0 < 64: a K scale
            st.bars[("raw_k_full", ks)].arrive()
            yield ("step",)
        issue(st, rng, "k", ks, t)
        yield ("step",)
        if t >= cfg.v_stages and "no_v_empty_wait" not in cfg.mutate:
            yield from wait(st, ("raw_v_empty", vs), ((t // cfg.v_stages) & 1) ^ 1)
        issue(st, rng, "v", vs, t)
        yield ("step",)


def scale_threads(st: State, v_group: bool):
    """Loader threads 1..63 (K scales) or 64..127 (V scales); per-token scales only."""
    cfg = st.cfg
    for t in range(st.tiles):
        ks = t % cfg.k_stages
        if t >= cfg.k_stages and "no_k_empty_wait" not in cfg.mutate:
            yield from wait(st, ("raw_k_empty", ks), ((t // cfg.k_stages) & 1) ^ 1)
        if v_group:
            write(st, ("v_scale", t % cfg.v_slots), ("vs", t))
        else:
            write(st, ("k_scale", ks, 1), ("ks", t))
        st.bars[("raw_k_full", ks)].arrive(64 if v_group else 63)
        yield ("step",)


def named_bar(st: State, c: int):
    gen = st.named_calls[c]
    st.named_calls[c] += 1
    st.named_arrivals[gen] = st.named_arrivals.get(gen, 0) + 1
    if st.named_arrivals[gen] < 2:
        yield ("wait", lambda: st.named_arrivals[gen] >= 2, f"named barrier 2, generation {gen}")


def consume_tile(st: State, c: int, j: int, seg: int):
    cfg = st.cfg
    ks, vs = j % cfg.k_stages, j % cfg.v_stages
    q = {("q", h): ("Q", seg) for h in range(2)}
    yield from wait(st, ("raw_v_full", vs), (j // cfg.v_stages) & 1)
    yield from read(st, f"consumer {c} converting V({j})", {("raw_v", vs): ("V", j)})
    write(st, ("v_op", c), ("V", j))
    st.bars[("raw_v_empty", vs)].arrive(128)
    yield from wait(st, ("raw_k_full", ks), (j // cfg.k_stages) & 1)
    yield from read(st, f"consumer {c} QK^T({j})", {("raw_k", ks): ("K", j), **q})
    early = "early_k_release" in cfg.mutate
    if early:
        st.bars[("raw_k_empty", ks)].arrive(4)
    if cfg.per_token:
        yield from read(st, f"consumer {c} K scales({j})", {("k_scale", ks, p): ("ks", j) for p in range(2)})
    if not early:
        st.bars[("raw_k_empty", ks)].arrive(4)
    yield from read(st, f"consumer {c} softmax({j})", {("row_mult", h): ("Q", seg) for h in range(2)})
    if cfg.per_token:
        yield from read(st, f"consumer {c} P x V scales({j})", {("v_scale", j % cfg.v_slots): ("vs", j)})
    yield from read(st, f"consumer {c} PV({j})", {("v_op", c): ("V", j)})


def consumer(st: State, c: int):
    j = 0
    for seg, n in enumerate(st.cfg.segments):
        yield from named_bar(st, c)  # both done with the previous Q and row_mult
        write(st, ("q", c), ("Q", seg))  # consumer c's rows of Q and row_mult (every segment)
        write(st, ("row_mult", c), ("Q", seg))
        yield from named_bar(st, c)
        for _ in range(n):
            if (j & 1) == c:
                yield from consume_tile(st, c, j, seg)
            j += 1
        # epilogue: (max, sum) through row_ml, O in three rounds through the Q tile
        write(st, ("row_ml", c), ("ml", c, seg))
        yield from named_bar(st, c)
        yield from read(st, f"consumer {c} merging (max, sum)", {("row_ml", c ^ 1): ("ml", c ^ 1, seg)})
        if c == 1:
            write(st, ("q", 0), ("O1", seg))
            write(st, ("q", 1), ("O1", seg))
        yield from named_bar(st, c)
        if c == 0:
            yield from read(st, "consumer 0 merging O round 2", {("q", h): ("O1", seg) for h in range(2)})
            write(st, ("q", 0), ("O2", seg))
            write(st, ("q", 1), ("O2", seg))
        yield from named_bar(st, c)
        if c == 1:
            yield from read(st, "consumer 1 merging O round 3", {("q", h): ("O2", seg) for h in range(2)})


def land_one(st: State, rng: random.Random) -> None:
    i = rng.randrange(len(st.in_flight))
    copy = st.in_flight[i]
    buf, tag, bar, _ = copy
    if st.reading.get(buf):
        raise ModelError(f"a piece of {tag} landed in {buf} while {st.mem.get(buf)} was being read")
    copy[3] -= 1
    st.landing[buf] -= 1
    st.mem[buf] = tag if copy[3] == 0 else ("partial", tag)
    if copy[3] == 0:
        del st.in_flight[i]
        del st.landing[buf]
    st.bars[bar].land(1)


def run_once(cfg: Config, rng: random.Random) -> None:
    st = make_state(cfg)
    actors = {"loader0": loader0(st, rng), "cons0": consumer(st, 0), "cons1": consumer(st, 1)}
    if cfg.per_token:  # per-tensor: threads 1..127 return at once
        actors["loader_k_scales"] = scale_threads(st, False)
        actors["loader_v_scales"] = scale_threads(st, True)
    speed = {a: rng.choice([0.2, 1.0, 1.0, 3.0]) for a in actors}  # some actors run far ahead
    copy_speed = rng.choice([0.3, 1.0, 3.0])                       # slow or fast copies
    waiting: dict[str, tuple] = {}  # actor -> (predicate, description) it is blocked on
    while actors:
        runnable = [a for a in actors if a not in waiting or waiting[a][0]()]
        if not runnable and not st.in_flight:
            raise ModelError("deadlock: " + "; ".join(f"{a}: {waiting[a][1]}" for a in actors))
        weights = [speed[a] for a in runnable]
        if st.in_flight:
            runnable.append("copy")
            weights.append(copy_speed * len(st.in_flight))
        name = rng.choices(runnable, weights)[0]
        if name == "copy":
            land_one(st, rng)
            continue
        _v5.step_actor(actors, waiting, name)
    if st.in_flight:
        raise ModelError("copies left in flight at the end")


def random_config(rng: random.Random, which: str, mutate: str) -> Config:
    name = rng.choice(sorted(CONFIGS)) if which == "mix" else which
    ks, vs, per_token = CONFIGS[name]
    segments = [rng.choice([0, 1, 1, 2, 3, 5, 8, 13]) for _ in range(rng.randint(1, 4))]
    return Config(name, ks, vs, per_token, segments, mutate)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--config", default="mix", choices=["mix", *sorted(CONFIGS)])
    ap.add_argument("--mutate", default="")
    args = ap.parse_args(argv)
    unknown = [m for m in args.mutate.split(",") if m and m not in MUTATIONS]
    if unknown:
        ap.error(f"unknown mutation(s) {unknown}; known: {', '.join(MUTATIONS)}")
    rng = random.Random(args.seed)
    failures = 0
    first = None
    for i in range(args.runs):
        cfg = random_config(rng, args.config, args.mutate)
        try:
            run_once(cfg, rng)
        except ModelError as e:
            failures += 1
            first = first or f"run {i} {cfg}: {e}"
    print(f"{args.runs} random schedules, config {args.config}, mutation '{args.mutate or 'none'}': "
          f"{failures} failed")
    if first:
        print("first failure:", first)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
