"""Runs a function on several local processes that form a mesh (tests, benchmarks).

Each rank is a fresh ``spawn`` process: ``target(ctx)`` gets a :class:`RankContext`
with its rank, role, a client of the parent's ``TCPStore`` on 127.0.0.1 and free-form
arguments, and returns a picklable result. The parent never blocks past its timeout:
it collects results with a deadline, then kills whatever is still running.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class RankContext:
    rank: int
    world_size: int
    role: str
    roles: list[str]
    store_port: int
    args: dict[str, Any] = field(default_factory=dict)

    def store(self, timeout_s: float = 30.0) -> Any:
        from torch.distributed import TCPStore

        return TCPStore("127.0.0.1", self.store_port, is_master=False,
                        timeout=datetime.timedelta(seconds=timeout_s))


@dataclass
class RankResult:
    rank: int
    ok: bool
    value: Any = None
    error_type: str = ""
    error: str = ""
    exitcode: int | None = None


def _child(target: Callable[[RankContext], Any], ctx: RankContext, env: dict[str, str], results: Any) -> None:
    os.environ.update(env)  # before UCX reads its configuration
    # The libucx wheel's libraries first (native() loads them before afdkit._C): nothing
    # the target imports may resolve an older system libucp.so.0 before them.
    from afdkit._native import native

    native().mesh.check_ucx()
    import torch

    torch.set_num_threads(1)  # ranks share the host's cores; intra-op thread pools would fight
    try:
        value = target(ctx)
        results.put(RankResult(ctx.rank, True, value))
    except BaseException as exc:  # report every failure to the parent, then exit
        results.put(RankResult(ctx.rank, False, None, type(exc).__name__,
                               f"{exc}\n{traceback.format_exc()}"))


def run_ranks(target: Callable[[RankContext], Any], roles: list[str], *, args: dict[str, Any] | None = None,
              env: dict[str, str] | None = None, timeout_s: float = 60.0) -> list[RankResult]:
    """Runs ``target`` on ``len(roles)`` processes; returns one RankResult per rank.

    A rank that neither returned nor raised within ``timeout_s`` (hung, or killed) gets
    ``ok=False`` with ``error_type`` "Timeout" or "Died".
    """
    from torch.distributed import TCPStore

    server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                      timeout=datetime.timedelta(seconds=timeout_s))
    spawn = mp.get_context("spawn")
    results = spawn.Queue()
    procs = []
    for rank, role in enumerate(roles):
        ctx = RankContext(rank, len(roles), role, list(roles), server.port, dict(args or {}))
        p = spawn.Process(target=_child, args=(target, ctx, dict(env or {}), results), daemon=True)
        p.start()
        procs.append(p)
    out: dict[int, RankResult] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < len(procs) and time.monotonic() < deadline:
            try:
                r = results.get(timeout=0.05)
                out[r.rank] = r
            except queue.Empty:
                if all(not p.is_alive() for p in procs) and results.empty():
                    break
        for p in procs:
            p.join(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    for rank, p in enumerate(procs):
        if rank not in out:
            died = p.exitcode is not None and p.exitcode != 0
            out[rank] = RankResult(rank, False, None, "Died" if died else "Timeout",
                                   f"rank {rank} exited with {p.exitcode}" if died else f"rank {rank} hung",
                                   p.exitcode)
        else:
            out[rank].exitcode = p.exitcode
    return [out[r] for r in range(len(procs))]


def check_all_ok(results: list[RankResult]) -> list[Any]:
    """The values of all ranks; raises AssertionError listing every failed rank."""
    bad = [r for r in results if not r.ok]
    if bad:
        raise AssertionError("\n".join(f"rank {r.rank}: {r.error_type}: {r.error}" for r in bad))
    return [r.value for r in results]


UCX_ENVS: dict[str, dict[str, str]] = {
    "tcp": {"UCX_TLS": "tcp", "UCX_NET_DEVICES": "lo"},
    "shm": {"UCX_TLS": "sm,self"},
}

__all__ = ["RankContext", "RankResult", "run_ranks", "check_all_ok", "UCX_ENVS"]
