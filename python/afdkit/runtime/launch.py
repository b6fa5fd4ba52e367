"""Starting the processes of a run, watching them, and ending them cleanly.

Locally (:func:`launch_local`) the launcher hosts a ``TCPStore`` on 127.0.0.1 and
spawns one process per rank. Under torchrun (:func:`launch_torchrun`, chosen when
``RANK`` and ``WORLD_SIZE`` are set) each process is one rank: rank 0 hosts the store
on ``MASTER_ADDR:MASTER_PORT``, every rank leaves its result in the store, and rank 0
gathers them and reports.

Failures: a rank that raises reports its error and aborts its mesh, so every peer's
pending call fails at once (``MeshPeerLost``); a rank that dies silently (killed) is
found by the peers' liveness checks within the keepalive interval, and by the
launcher through its exit status. Either way the launcher waits at most the mesh
timeout (plus a margin) for the others to exit, kills whatever is left, and names the
rank that failed first. Ctrl-C: the workers ignore SIGINT; the launcher sends them
SIGTERM (they abort their meshes and exit), waits briefly, then kills (at once on a
second Ctrl-C). Workers also exit when their launcher disappears, so no process
outlives a run.

The launcher turns SIGINT into a flag its loop polls instead of taking it as a
KeyboardInterrupt: an exception raised at an arbitrary bytecode can be swallowed
(a finalizer, a callback) or cut a shutdown in half (a second Ctrl-C). SIGINT is
blocked while a worker starts, so a Ctrl-C in that window cannot kill a worker
before it ignores SIGINT. A launcher that inherited SIGINT ignored (a shell's
background job) keeps ignoring it, as any program does.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import queue
import secrets
import signal
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from afdkit.runtime.config import RunConfig

UCX_TRANSPORT_ENVS = {"tcp": {"UCX_TLS": "tcp", "UCX_NET_DEVICES": "lo"}, "shm": {"UCX_TLS": "sm,self"}}
_TERM_GRACE_S = 10.0
_REPORT_GRACE_S = 2.0


@dataclass
class RankFailure:
    rank: int
    role: str
    what: str
    root: bool = False  # died silently or raised its own error: the likely cause of the others'


@dataclass
class RunOutcome:
    config: RunConfig
    results: dict[int, dict[str, Any]] = field(default_factory=dict)
    failures: list[RankFailure] = field(default_factory=list)
    interrupted: bool = False
    wall_s: float = 0.0
    pids: dict[int, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failures and not self.interrupted and len(self.results) == self.config.world_size

    def failure_message(self) -> str:
        if self.interrupted:
            return "afdkit run: interrupted (Ctrl-C); every worker was stopped"
        fails = sorted(self.failures, key=lambda f: (not f.root, f.rank))
        lines = [f"afdkit run: failed: rank {f.rank} ({f.role}) {f.what}" if i == 0 else
                 f"  then rank {f.rank} ({f.role}) {f.what}" for i, f in enumerate(fails)]
        return "\n".join(lines) if lines else "afdkit run: failed: not every rank returned a result"


def transport_env(cfg: RunConfig) -> dict[str, str]:
    """UCX settings for local CPU runs (left to the user's environment when set)."""
    if cfg.device != "cpu" or cfg.transport == "auto" or "UCX_TLS" in os.environ:
        return {}
    return dict(UCX_TRANSPORT_ENVS[cfg.transport])


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def _exit_text(code: int | None) -> str:
    if code is None:
        return "did not exit"
    return f"was killed by {_signal_name(code)}" if code < 0 else f"exited with status {code}"


# ---- the child side --------------------------------------------------------------------------


def _watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(0.5)
        if os.getppid() != parent_pid:
            os._exit(1)  # the launcher is gone: never linger as an orphan


def _on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _child(rank: int, cfg: RunConfig, store_port: int, secret: bytes, mesh_id: str, env: dict[str, str],
           messages: Any, parent_pid: int) -> None:
    os.environ.update(env)  # before UCX reads its configuration
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the launcher's to handle
    # Started with SIGINT blocked (see _start): a Ctrl-C pending since then is discarded.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGTERM, _on_sigterm)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    try:
        from afdkit._native import native

        native().mesh.check_ucx()  # the libucx wheel's libraries before anything else loads one
        import torch

        if cfg.device == "cpu":
            torch.set_num_threads(1)  # ranks share the host's cores
        from afdkit.runtime.rank import run_afd_rank, run_colocated_rank

        def progress(r: int, s: int) -> None:
            messages.put(("step", r, s))

        if cfg.colocated:
            res = run_colocated_rank(cfg, rank, rank, progress)
        else:
            from torch.distributed import TCPStore

            store = TCPStore("127.0.0.1", store_port, is_master=False,
                             timeout=datetime.timedelta(seconds=max(60.0, cfg.timeout_s)))
            res = run_afd_rank(cfg, rank, rank, store, secret, mesh_id, progress)
        messages.put(("done", rank, res))
    except BaseException as exc:  # report every failure to the launcher, then exit non-zero
        messages.put(("error", rank, f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        messages.close()
        messages.join_thread()
        sys.exit(1)
    messages.close()
    messages.join_thread()


# ---- the launcher side ------------------------------------------------------------------------


class _Monitor:
    """Collects messages and exit statuses of the spawned ranks."""

    def __init__(self, cfg: RunConfig, procs: list[Any], messages: Any, on_step: Callable[[int, int], None] | None):
        self.cfg, self.procs, self.messages, self.on_step = cfg, procs, messages, on_step
        self.outcome = RunOutcome(cfg, pids={r: p.pid for r, p in enumerate(procs)})
        self.errors: dict[int, str] = {}
        self.tracebacks: dict[int, str] = {}
        self.dead_since: dict[int, float] = {}

    def drain(self, timeout: float) -> None:
        try:
            msg = self.messages.get(timeout=timeout)
        except queue.Empty:
            return
        while True:
            kind, rank = msg[0], msg[1]
            if kind == "step" and self.on_step is not None:
                self.on_step(rank, msg[2])
            elif kind == "done":
                self.outcome.results[rank] = msg[2]
            elif kind == "error":
                self.errors[rank], self.tracebacks[rank] = msg[2], msg[3]
            try:
                msg = self.messages.get_nowait()
            except queue.Empty:
                return

    def settled(self, rank: int) -> bool:
        return rank in self.outcome.results or rank in self.errors

    def check_exits(self) -> None:
        now = time.monotonic()
        for r, p in enumerate(self.procs):
            if not p.is_alive() and not self.settled(r):
                self.dead_since.setdefault(r, now)

    def silent_deaths(self) -> list[int]:
        """Ranks that exited without a message for longer than the report grace."""
        now = time.monotonic()
        return [r for r, t in self.dead_since.items() if not self.settled(r) and now - t > _REPORT_GRACE_S]

    def failed(self) -> bool:
        return bool(self.errors) or bool(self.silent_deaths())

    def finish(self) -> RunOutcome:
        cfg = self.cfg
        for r, p in enumerate(self.procs):
            role = "colocated" if cfg.colocated else cfg.role(r)
            if r in self.errors:
                # A peer's loss reported by the mesh is a consequence; anything else a cause.
                consequence = self.errors[r].startswith(("MeshPeerLost", "MeshTimeout", "SystemExit"))
                self.outcome.failures.append(RankFailure(r, role, f"raised {self.errors[r]}", root=not consequence))
            elif r not in self.outcome.results:
                what = _exit_text(p.exitcode) + " without reporting a result"
                self.outcome.failures.append(RankFailure(r, role, what, root=p.exitcode is not None))
        return self.outcome


class _Interrupts:
    """SIGINT as a counter the launcher polls (main thread only; elsewhere, and where
    SIGINT was inherited ignored, the disposition is left as it is)."""

    def __init__(self) -> None:
        self.count = 0
        self._saved: Any = None

    def __enter__(self) -> "_Interrupts":
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            self._saved = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def _on_sigint(self, signum: int, frame: Any) -> None:
        self.count += 1

    def __exit__(self, *exc: object) -> None:
        if self._saved is not None:
            signal.signal(signal.SIGINT, self._saved)
            self._saved = None


def _start(p: Any) -> None:
    """Starts a worker with SIGINT blocked: it inherits the mask across fork and exec
    and unblocks SIGINT only once it ignores it (a Ctrl-C that comes while it imports
    must not kill it with a KeyboardInterrupt of its own)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        p.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _stop(procs: list[Any], grace_s: float, hurry: Callable[[], bool] = lambda: False) -> None:
    """SIGTERM to every live worker, up to ``grace_s`` for them to exit (cut short when
    ``hurry()`` turns true, e.g. a second Ctrl-C), then SIGKILL. Always reaps them."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and not hurry() and any(p.is_alive() for p in procs):
        time.sleep(0.05)
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        if p.pid is not None:  # started
            p.join(timeout=5)


def launch_local(cfg: RunConfig, on_start: Callable[[dict[int, int]], None] | None = None,
                 on_step: Callable[[int, int], None] | None = None) -> RunOutcome:
    """Spawns ``cfg.world_size`` local processes and runs the job; never leaves one behind."""
    from torch.distributed import TCPStore

    cfg.validate()
    server = None
    if not cfg.colocated:
        server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=max(60.0, cfg.timeout_s)))
    port = server.port if server is not None else 0
    secret, mesh_id = secrets.token_bytes(32), f"afdkit-run-{uuid.uuid4().hex[:12]}"
    ctx = mp.get_context("spawn")
    messages = ctx.Queue()
    env = transport_env(cfg)
    procs = [ctx.Process(target=_child, args=(r, cfg, port, secret, mesh_id, env, messages, os.getpid()),
                         name=f"afdkit-rank{r}", daemon=True) for r in range(cfg.world_size)]
    mon = _Monitor(cfg, procs, messages, on_step)
    t0 = time.monotonic()
    with _Interrupts() as intr:
        try:
            _run_loop(cfg, procs, mon, intr, on_start)
        finally:
            if intr.count:
                mon.outcome.interrupted = True
                seen = intr.count
                _stop(procs, _TERM_GRACE_S, hurry=lambda: intr.count > seen)
            _stop(procs, 2.0)
            mon.outcome.wall_s = time.monotonic() - t0
            messages.close()
    return mon.finish()


def _run_loop(cfg: RunConfig, procs: list[Any], mon: _Monitor, intr: _Interrupts,
              on_start: Callable[[dict[int, int]], None] | None) -> None:
    """Starts the workers and watches them until all ended, a failure's deadline
    passed (workers then stopped) or Ctrl-C (``intr.count``; the caller stops them)."""
    fail_deadline: float | None = None
    for p in procs:
        if intr.count:
            return
        _start(p)
    mon.outcome.pids = {r: p.pid for r, p in enumerate(procs)}
    if on_start is not None:
        on_start(mon.outcome.pids)
    while not intr.count:
        mon.drain(0.1)
        mon.check_exits()
        if all(not p.is_alive() for p in procs):
            mon.drain(0.2)
            if all(mon.settled(r) for r in range(len(procs))) or time.monotonic() - max(
                    mon.dead_since.values(), default=0.0) > _REPORT_GRACE_S:
                return
        if fail_deadline is None and mon.failed():
            # The peers fail within the mesh timeout (at once if the failed rank aborted).
            fail_deadline = time.monotonic() + cfg.timeout_s + 5.0
        if fail_deadline is not None and time.monotonic() > fail_deadline:
            _stop(procs, 2.0)
            mon.drain(0.2)
            return


def torchrun_env() -> dict[str, Any] | None:
    """RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT when set (torchrun)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    try:
        return {"rank": int(os.environ["RANK"]), "world_size": int(os.environ["WORLD_SIZE"]),
                "local_rank": int(os.environ.get("LOCAL_RANK", os.environ["RANK"])),
                "addr": os.environ.get("MASTER_ADDR", "127.0.0.1"), "port": int(os.environ.get("MASTER_PORT", "29500"))}
    except ValueError as exc:
        raise ValueError(f"afdkit run: malformed torchrun environment: {exc}") from None


def launch_torchrun(cfg: RunConfig, env: dict[str, Any],
                    on_step: Callable[[int, int], None] | None = None) -> RunOutcome:
    """This process is one rank of a torchrun job. Rank 0 returns every rank's result."""
    from torch.distributed import TCPStore

    from afdkit.runtime.rank import run_afd_rank, run_colocated_rank

    cfg.validate()
    rank, world = env["rank"], env["world_size"]
    if world != cfg.world_size:
        raise ValueError(f"afdkit run: WORLD_SIZE is {world} but --attention {cfg.attention} + --ffn {cfg.ffn} "
                         f"= {cfg.world_size} processes")
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", f"{env['addr']}:{env['port']}")
    secret_text = os.environ.get("AFDKIT_SECRET")
    if not secret_text:
        print("afdkit run: AFDKIT_SECRET is not set; deriving the mesh secret from the run id (anyone who can "
              "reach the store can join)", file=sys.stderr)
        secret_text = f"afdkit/{run_id}"
    timeout = datetime.timedelta(seconds=max(600.0, cfg.timeout_s))
    store = TCPStore(env["addr"], env["port"], is_master=rank == 0, wait_for_workers=False, timeout=timeout)
    mesh_id = f"afdkit-run/{run_id}"
    outcome = RunOutcome(cfg, pids={rank: os.getpid()})
    t0 = time.monotonic()
    if cfg.colocated:
        res = run_colocated_rank(cfg, rank, env["local_rank"], on_step)
    else:
        res = run_afd_rank(cfg, rank, env["local_rank"], store, secret_text.encode(), mesh_id, on_step)
    outcome.results[rank] = res
    if rank == 0:
        for r in range(1, world):
            key = f"{mesh_id}/result/{r}"
            store.wait([key], timeout)
            outcome.results[r] = pickle.loads(store.get(key))
    else:
        # The last store call of a rank other than 0. It returns once the store (in rank
        # 0's process) holds the result, and rank 0 reads it before it exits. No call may
        # follow: rank 0 may be gone by then, and a wait for a "gathered" key, once done
        # here, failed whenever a loaded host scheduled this rank only after rank 0 had
        # set that key and exited ("Connection was likely closed").
        store.set(f"{mesh_id}/result/{rank}", pickle.dumps(res))
    outcome.wall_s = time.monotonic() - t0
    return outcome


__all__ = ["RunOutcome", "RankFailure", "launch_local", "launch_torchrun", "torchrun_env", "transport_env",
           "UCX_TRANSPORT_ENVS"]
