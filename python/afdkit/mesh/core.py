"""The mesh: ranks with roles, registered buffers, one-sided put + signal, waits.

Typical use (every rank runs the same lines)::

    mesh = Mesh(rank, world_size, role="attention", config=MeshConfig(mesh_id="job-42"))
    inbox = mesh.alloc("inbox", 1 << 20)         # registered, UCX-allocated host memory
    sig = mesh.alloc("sig", 64)                   # signal words live in registered memory too
    mesh.connect(store, secret)                   # collective: verify peers, exchange keys
    mesh.put(x, peer=1, name="inbox", signal=("sig", 0, seq))   # data, then the signal
    mesh.wait("sig", 0, seq, peer=0)              # host-blocking, with a timeout
    mesh.close()

Region names are global: a put names the region by the name its owner registered.
Signals are 8-byte words written after the data (fenced); waiters compare ``>=``, so a
signal carries a monotonically increasing sequence number from a single writer.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from afdkit._native import native
from afdkit.mesh import bootstrap
from afdkit.mesh.errors import MeshError

ROLES = ("attention", "ffn")


@dataclass
class MeshConfig:
    """Settings of one rank's mesh. Times are in seconds."""

    mesh_id: str = "afdkit"
    timeout_s: float = 30.0  # default for waits, flushes and the bootstrap
    keepalive_s: float = 1.0  # how fast a silent dead peer is found (UCX keepalive + pid check)
    # Host waits poll (and drive UCX) until spin_us passed without any progress or change
    # of the awaited word, then sleep with a backoff capped at max_sleep_us; the progress
    # thread polls spin_us after its last activity, then blocks on the UCX event fd.
    # Latency vs CPU: an idle rank burns nothing either way.
    spin_us: int = 50
    max_sleep_us: int = 200  # cap of the backoff of host waits
    device: int | None = None  # this rank's CUDA device (IPC mappings); None on CPU-only ranks
    ucx_options: dict[str, str] = field(default_factory=dict)  # e.g. {"TLS": "tcp", "NET_DEVICES": "lo"}
    # UCX endpoint error handling: "auto" (UCX failure reports where a transport supports
    # them, else -- same host only -- the engine's own process check), "peer" or "none".
    err_mode: str = "auto"
    # Over tcp a put + signal of up to this many bytes is one active message (data and
    # signal written by the receiver); None: the engine's default (128 KiB), 0: off.
    fused_max_bytes: int | None = None
    # Same-host shm peers (UCX-allocated regions): a put + signal of up to this many bytes
    # is a memcpy + release store into the peer's mapped memory; None: no limit, 0: off.
    direct_max_bytes: int | None = None
    trace: bool = False
    trace_capacity: int = 1 << 16


@dataclass(frozen=True)
class RemoteRegion:
    peer: int
    name: str
    handle: int
    nbytes: int
    cuda: bool
    backend: str  # "ipc" (CUDA IPC + copy engines) or "ucx"


@dataclass
class _Local:
    id: int
    tensor: torch.Tensor  # keeps the memory alive
    nbytes: int
    cuda: bool


def _as_secret(secret: bytes | str) -> bytes:
    if isinstance(secret, str):
        secret = secret.encode()
    if not isinstance(secret, bytes) or len(secret) == 0:
        raise ValueError("afdkit.mesh.connect: a non-empty shared secret (bytes or str) is required")
    return secret


class Mesh:
    """One rank of a mesh of attention and FFN ranks (see the module docstring)."""

    def __init__(self, rank: int, world_size: int, role: str, config: MeshConfig | None = None) -> None:
        if role not in ROLES:
            raise ValueError(f"afdkit.mesh.Mesh: role must be one of {ROLES}, got {role!r}")
        self.config = config or MeshConfig()
        self.rank, self.world_size, self.role = rank, world_size, role
        c = self.config
        native().mesh.check_ucx()  # refuse a libucp older than the build, naming both versions
        ucx_options = dict(c.ucx_options)
        for key, value in (("FUSED", c.fused_max_bytes), ("DIRECT", c.direct_max_bytes)):
            if value is None:  # engine settings travel with the UCX options (AFDKIT_*)
                continue
            if int(value) < 0:
                raise ValueError(f"afdkit.mesh.MeshConfig: {key.lower()}_max_bytes must be >= 0, got {value}")
            ucx_options[f"AFDKIT_{key}_MAX_BYTES"] = str(int(value))
        self._engine = native().mesh.Engine(
            rank, world_size, device=-1 if c.device is None else c.device, keepalive_s=c.keepalive_s,
            spin_us=c.spin_us, max_sleep_us=c.max_sleep_us, trace_capacity=c.trace_capacity,
            ucx_options=ucx_options, err_mode=c.err_mode)
        self._engine.trace_enable(c.trace)
        self._local: dict[str, _Local] = {}
        self._remote: dict[tuple[int, str], RemoteRegion] = {}
        self.roles: list[str] = []
        self._connected = False
        self._published: set[str] = set()
        self._store: Any = None
        self._secret = b""

    # ---- setup -------------------------------------------------------------------

    def register(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Registers a contiguous tensor (host or CUDA) under ``name``; returns it."""
        self._check_setup(name)
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"afdkit.mesh.register: '{name}' must be a torch.Tensor, got {type(tensor).__name__}")
        if not tensor.is_contiguous() or tensor.numel() == 0:
            raise ValueError(f"afdkit.mesh.register: '{name}' must be a non-empty contiguous tensor")
        cuda = tensor.device.type == "cuda"
        nbytes = tensor.numel() * tensor.element_size()
        rid = self._engine.register_memory(tensor.data_ptr(), nbytes, cuda, tensor.device.index if cuda else -1)
        self._local[name] = _Local(rid, tensor, nbytes, cuda)
        return tensor

    def alloc(self, name: str, nbytes: int, device: str | torch.device = "cpu") -> torch.Tensor:
        """A zeroed, registered uint8 buffer of ``nbytes``: UCX-allocated host memory
        (shared-memory transports write it directly) or, on CUDA, a torch allocation."""
        self._check_setup(name)
        device = torch.device(device)
        if device.type == "cuda":
            buf = torch.zeros(nbytes, dtype=torch.uint8, device=device)
            # The zeros must have landed before a peer can learn the address and write into it.
            torch.cuda.synchronize(device)
            return self.register(name, buf)
        rid = self._engine.allocate_host(int(nbytes))
        tensor = torch.from_dlpack(self._engine.host_view(rid))
        self._local[name] = _Local(rid, tensor, int(nbytes), False)
        return tensor

    def _check_setup(self, name: str) -> None:
        if name in self._local or name.startswith("__"):
            raise ValueError(f"afdkit.mesh: a region named '{name}' is already registered on rank {self.rank}")

    def _region_records(self, names: list[str]) -> dict[str, Any]:
        def b64(b: bytes) -> str:
            return base64.b64encode(b).decode()

        out = {}
        for name in names:
            info = self._engine.region(self._engine.control_region() if name == "__ctrl__" else self._local[name].id)
            out[name] = {"addr": info["ptr"], "nbytes": info["nbytes"], "cuda": info["cuda"],
                         "rkey": b64(info["rkey"]), "ipc": b64(info["ipc"]), "ipc_offset": info["ipc_offset"]}
            self._published.add(name)
        return out

    def _record(self) -> dict[str, Any]:
        return {"rank": self.rank, "world_size": self.world_size, "role": self.role, "pid": os.getpid(),
                "host": bootstrap.host_id(), "address": base64.b64encode(self._engine.address()).decode(),
                "regions": self._region_records(["__ctrl__", *self._local])}

    def _add_remote_regions(self, r: int, regions: dict[str, Any]) -> None:
        for name, reg in regions.items():
            handle = self._engine.add_remote_region(
                r, int(reg["addr"]), int(reg["nbytes"]), bool(reg["cuda"]), base64.b64decode(reg["rkey"]),
                base64.b64decode(reg["ipc"]), int(reg["ipc_offset"]))
            if name == "__ctrl__":
                self._engine.set_peer_control(r, handle)
                continue
            self._remote[(r, name)] = RemoteRegion(r, name, handle, int(reg["nbytes"]), bool(reg["cuda"]),
                                                   self._engine.backend(r, handle))

    def connect(self, store: bootstrap.Store, secret: bytes | str, timeout_s: float | None = None) -> None:
        """Collective: verifies every peer with the shared secret, connects, exchanges keys.

        Raises MeshAuthError (on every rank) when any rank's secret differs, MeshTimeout
        when a rank does not show up within ``timeout_s``.
        """
        if self._connected:
            raise MeshError("afdkit.mesh.connect: already connected")
        timeout_s = self.config.timeout_s if timeout_s is None else timeout_s
        me = self._record()
        peers = bootstrap.exchange(store, self.config.mesh_id, self.rank, self.world_size, _as_secret(secret),
                                   me, timeout_s)
        self.roles = [me["role"] if r == self.rank else peers[r]["role"] for r in range(self.world_size)]
        for r, rec in sorted(peers.items()):
            if rec["role"] not in ROLES:
                raise ValueError(f"afdkit.mesh.connect: rank {r} announced an unknown role {rec['role']!r}")
            self._engine.add_peer(r, f"rank {r} ({rec['role']})", base64.b64decode(rec["address"]), int(rec["pid"]),
                                  rec["host"] == me["host"])
            self._add_remote_regions(r, rec["regions"])
        self._store, self._secret = store, _as_secret(secret)
        self._connected = True
        bootstrap.barrier(store, self.config.mesh_id, "connected", self.rank, self.world_size, timeout_s)

    def publish(self, label: str, timeout_s: float | None = None) -> None:
        """Collective (after connect): every rank learns the regions the others registered
        since their last exchange. ``label`` names this round; use each label once."""
        if not self._connected:
            raise MeshError("afdkit.mesh.publish: connect() first")
        timeout_s = self.config.timeout_s if timeout_s is None else timeout_s
        record = {"rank": self.rank, "world_size": self.world_size,
                  "regions": self._region_records([n for n in self._local if n not in self._published])}
        peers = bootstrap.exchange(self._store, f"{self.config.mesh_id}/{label}", self.rank, self.world_size,
                                   self._secret, record, timeout_s)
        for r, rec in sorted(peers.items()):
            self._add_remote_regions(r, rec["regions"])

    # ---- queries ---------------------------------------------------------------------

    def ranks(self, role: str) -> list[int]:
        """The ranks of ``role`` in rank order (after connect)."""
        return [r for r, x in enumerate(self.roles) if x == role]

    def remote(self, peer: int, name: str) -> RemoteRegion:
        try:
            return self._remote[(peer, name)]
        except KeyError:
            known = sorted({n for (p, n) in self._remote if p == peer})
            raise ValueError(f"afdkit.mesh: rank {peer} has no region named '{name}' (known: {known}); "
                             "is it a peer of this rank and registered before connect()?") from None

    def local(self, name: str) -> torch.Tensor:
        return self._local_ref(name).tensor

    def _local_ref(self, name: str) -> _Local:
        try:
            return self._local[name]
        except KeyError:
            raise ValueError(f"afdkit.mesh: rank {self.rank} has no region named '{name}' "
                             f"(known: {sorted(self._local)})") from None

    def endpoint_info(self, peer: int) -> str:
        """UCX's description of the endpoint to ``peer`` (its lanes: ``rma_bw`` marks
        zero-copy puts), after a line with the error handling mode chosen for it."""
        return self._engine.endpoint_info(peer)

    @property
    def engine(self) -> Any:
        """The native engine (raw pointers, for hot loops such as benchmarks)."""
        return self._engine

    # ---- data path -------------------------------------------------------------------------

    def put(self, src: torch.Tensor, peer: int, name: str, offset: int = 0, *, nbytes: int | None = None,
            signal: tuple[str, int, int] | None = None, stream: int | None = None, tag: int = 0) -> None:
        """Writes ``src`` (contiguous; ``nbytes`` of it) into ``peer``'s region ``name`` at
        byte ``offset``, then the signal ``(region, byte offset, value)`` after the data.

        Returns once posted: keep ``src`` unchanged until :meth:`flush` (or until the
        receiver acknowledges). ``stream`` (a raw CUDA stream handle; ``0`` is the legacy
        default stream, torch's default) orders the put after that stream's work: CUDA IPC
        + stream write-value on one host, else UCX posted by the progress thread once the
        stream reaches it. ``None`` posts at once from this thread.
        """
        if not src.is_contiguous():
            raise ValueError("afdkit.mesh.put: 'src' must be contiguous")
        size = src.numel() * src.element_size() if nbytes is None else int(nbytes)
        if size > src.numel() * src.element_size():
            raise ValueError(f"afdkit.mesh.put: nbytes {size} exceeds the {src.numel() * src.element_size()} "
                             "bytes of 'src'")
        region = self.remote(peer, name)
        sig_region, sig_offset, sig_value = -1, 0, 0
        if signal is not None:
            sig_region, sig_offset, sig_value = self.remote(peer, signal[0]).handle, int(signal[1]), int(signal[2])
        self._engine.put(src.data_ptr(), size, peer, region.handle, int(offset), sig_region, sig_offset, sig_value,
                         int(stream or 0), int(tag), False, stream is not None)

    def wait(self, name: str, offset: int, value: int, *, timeout_s: float | None = None, peer: int | None = None,
             what: str | None = None) -> None:
        """Blocks until the local signal word ``name[offset]`` reaches ``value``.

        Raises MeshTimeout after ``timeout_s`` (default: the mesh timeout) and
        MeshPeerLost as soon as ``peer`` (or any rank, as reported by anyone) is lost.
        """
        loc = self._local_ref(name)
        self._check_word(name, loc, offset)
        self._engine.wait(loc.tensor.data_ptr() + offset, int(value),
                          self.config.timeout_s if timeout_s is None else float(timeout_s),
                          -1 if peer is None else peer, what or f"signal '{name}'+{offset} >= {value}", 0, loc.cuda)

    def wait_stream(self, name: str, offset: int, value: int, stream: int, *, timeout_s: float | None = None,
                    peer: int | None = None, what: str | None = None) -> None:
        """Stream-ordered wait: work queued on ``stream`` after this call waits until the
        signal word reaches ``value`` (cuStreamWaitValue64); the CPU is not blocked.

        The progress thread watches the word: if it does not reach ``value`` within
        ``timeout_s`` (default: the mesh timeout), or ``peer`` (any rank) is lost, the stream
        is released (the word is set to ``value``; what it guards is invalid) and the mesh
        is poisoned: the next :meth:`check`, wait, put or flush raises MeshTimeout naming
        this wait (MeshPeerLost for a lost peer). Call :meth:`check` after synchronizing
        the stream before trusting the data.
        """
        loc = self._local_ref(name)
        self._check_word(name, loc, offset)
        self._engine.wait_stream(loc.tensor.data_ptr() + offset, int(value), int(stream),
                                 self.config.timeout_s if timeout_s is None else float(timeout_s),
                                 -1 if peer is None else peer, what or f"signal '{name}'+{offset} >= {value}")

    def signal_value(self, name: str, offset: int) -> int:
        loc = self._local_ref(name)
        self._check_word(name, loc, offset)
        return self._engine.load(loc.tensor.data_ptr() + offset, loc.cuda)

    @staticmethod
    def _check_word(name: str, loc: _Local, offset: int) -> None:
        if offset % 8 or offset < 0 or offset + 8 > loc.nbytes:
            raise ValueError(f"afdkit.mesh: signal offset {offset} of '{name}' must be 8-byte aligned and inside "
                             f"its {loc.nbytes} bytes")

    def flush(self, timeout_s: float | None = None) -> None:
        """Waits until every put of this rank completed locally (sources reusable)."""
        self._engine.flush(self.config.timeout_s if timeout_s is None else timeout_s)

    def check(self, peer: int | None = None) -> None:
        """Raises MeshPeerLost if ``peer`` (None: any rank) was lost."""
        self._engine.check_health(-1 if peer is None else peer, "checked its peers")

    def abort(self) -> None:
        """Poisons the mesh: every rank's pending and later calls raise MeshPeerLost."""
        self._engine.abort()

    def close(self, timeout_s: float | None = None) -> None:
        """Tells the peers this rank leaves, flushes and disconnects. Idempotent.

        The departure notice must reach every peer before the sockets close, or a peer
        that sees the disconnect first takes it for a crash and fails the whole mesh; so
        the flush may take up to ``timeout_s`` (default: the mesh's timeout), not a short
        fixed grace that a loaded host can overrun.
        """
        self._engine.close(self.config.timeout_s if timeout_s is None else timeout_s)

    def __enter__(self) -> "Mesh":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- tracing ----------------------------------------------------------------------------

    def set_tracing(self, on: bool) -> None:
        self._engine.trace_enable(on)

    def trace_events(self) -> list[tuple[int, int, int, int, int]]:
        """Raw events (tag, t_ns, nbytes, peer, kind); see :mod:`afdkit.mesh.trace`."""
        return list(self._engine.trace())

    def clear_trace(self) -> None:
        self._engine.trace_clear()


__all__ = ["Mesh", "MeshConfig", "RemoteRegion", "ROLES"]
