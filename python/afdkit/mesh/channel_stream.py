"""The stream-ordered protocol of the AFD channel on GPUs (``ChannelConfig.device="cuda:N"``).

Everything a message needs is queued on the caller's current CUDA stream; the CPU
never waits and no kernel spins:

- **flags, not sequence numbers.** Each slot (peer, layer parity, microbatch) has two
  0/1 flags in device memory: ``full`` at the receiver (set to 1 by the sender after the
  data) and ``free`` at the sender (set to 1 by the receiver once it is done with the
  slot; 1 at setup). A wait is ``armed = layer+1; wait flag >= 1; flag = 0; armed = 0``
  (``Engine.wait_flag``). Only constants go on the stream, so a captured CUDA graph
  replays a layer's exchange correctly any number of times.
- **one call per message and peer.** ``Engine.put_message`` queues the credit wait,
  the copies of every tensor straight from the caller's tensors into the peer's slot
  (``cudaMemcpyAsync`` on copy engines over NVLink), two header words (row count, a
  layer/microbatch check word) and the ``full`` flag, in that order.
- **ipc peers only.** Every peer must be reached over CUDA IPC; a channel with UCX
  peers is refused at construction (their puts, issued by the progress thread, can
  queue behind this rank's own stream waits and deadlock) -- they use the host-waited
  protocol (``stream_ordered=False``).
- **fixed layout.** Sections sit at the offsets of a ``max_tokens`` message whatever the
  row count, so a slot is also a fixed-size view: :meth:`AfdChannel.recv_batch_device`
  hands out ``[n_attention, max_tokens, ...]`` views and the row counts as a device
  tensor, with no host synchronisation.
- **watchdog.** The flags are registered with the engine's watchdog (armed words in
  mapped host memory, read by the progress thread): a wait that outlives the channel's
  timeout is released and the next call raises ``MeshTimeout``; a lost peer releases
  every wait and raises ``MeshPeerLost``. After synchronizing, ``mesh.check()`` says
  whether the data a released stream read can be trusted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from afdkit.mesh.errors import MeshError

if TYPE_CHECKING:  # pragma: no cover
    from afdkit.mesh.channel import AfdChannel, _Layout

_MAGIC = 0x41464443
_CONSUMED = 4  # TraceKind::kConsumed


def check_word(layer: int, mb: int) -> int:
    """The second header word: magic, layer and microbatch (a receiver's order check)."""
    return (_MAGIC << 32) | ((layer & 0xFFFFFF) << 8) | (mb & 0xFF)


@dataclass
class DeviceBatch:
    """What an FFN rank received for one (layer, microbatch), without a host sync.

    ``tensors[i]`` is a ``[n_attention, max_tokens, *spec.shape]`` view of the receive
    slots (rows past ``counts[a]`` are stale); ``counts`` an int64 device tensor
    ``[n_attention]``; ``row_index`` (routed) ``[n_attention, max_tokens]`` int32 views.
    The views stay valid until :meth:`AfdChannel.send_back` of the same (layer,
    microbatch), which releases the slots in stream order.
    """

    layer: int
    microbatch: int
    tensors: tuple[torch.Tensor, ...]
    counts: torch.Tensor
    sources: list[int]
    row_index: torch.Tensor | None = None


class FlagProtocol:
    """The GPU side of an :class:`AfdChannel` (see the module docstring)."""

    def __init__(self, ch: "AfdChannel", flags_name: str) -> None:
        self.ch = ch
        mesh, eng = ch.mesh, ch.mesh.engine
        self.eng = eng
        P, K, M = len(ch._peers), ch.K, ch.config.num_microbatches
        self.P, self.K = P, K
        flags = ch._sig  # 2*P*K int64 words: full[P][K] then free[P][K]
        flags.view(torch.int64)[P * K:].fill_(1)  # every slot starts free
        torch.cuda.synchronize(flags.device)
        side = "results" if ch.is_attention else "rows"
        labels, peers = [], []
        for what in ("full", "free"):
            for pi, p in enumerate(ch._peers):
                for k in range(K):
                    mb, parity = k % M, k // M
                    peers.append(p)
                    if what == "full":
                        labels.append(f"the {side} of microbatch {mb} (layer parity {parity}) from rank {p}")
                    else:
                        labels.append(f"rank {p} to release the slot of microbatch {mb} (layer parity {parity})")
        self.watch = eng.watch_flags(flags.data_ptr(), 2 * P * K, peers, labels, float(ch.timeout_s))
        self.flags_name = flags_name
        self.remote_in = {p: mesh.remote(p, ch._in_name) for p in ch._peers}
        remote_flags = {p: mesh.remote(p, flags_name) for p in ch._peers}
        self.remote_flags = {p: r.handle for p, r in remote_flags.items()}
        # The engine uses ipc only when both the slot and the flag region are mapped.
        self.ipc = {p: self.remote_in[p].backend == "ipc" and remote_flags[p].backend == "ipc" for p in ch._peers}
        ucx = [p for p in ch._peers if not self.ipc[p]]
        if ucx:
            eng.unwatch_flags(self.watch)
            raise MeshError(
                f"afdkit.mesh.AfdChannel: stream_ordered=True needs every peer over CUDA IPC (GPUs of one host, "
                f"MeshConfig.device set on every rank), but rank {mesh.rank} reaches ranks {ucx} over UCX. "
                "Stream-ordered puts to UCX peers are refused: UCX issues their CUDA copies from the progress "
                "thread, and those can queue behind this rank's own stream waits (a deadlock seen on H200s). "
                "Use stream_ordered=False (the host-waited protocol) with UCX peers")
        self.held = [[False] * K for _ in range(P)]  # in-slots handed out as views, not yet released
        self.peers_of_peer = len(ch.att if ch.is_attention else ch.ffn)

    @property
    def graph_safe(self) -> bool:
        """True when every peer is reached over ipc: the whole exchange is stream ops, so
        it can be captured in a CUDA graph (UCX puts are posted by the progress thread)."""
        return all(self.ipc.values())

    # ---- offsets --------------------------------------------------------------------------

    def full_index(self, pi: int, k: int) -> int:  # our full flag for peer pi's message
        return pi * self.K + k

    def free_index(self, pi: int, k: int) -> int:  # our free flag for our slot at peer pi
        return self.P * self.K + pi * self.K + k

    def full_at_peer(self, k: int) -> int:  # byte offset of our full flag in the peer's flags
        return (self.ch._me * self.K + k) * 8

    def free_at_peer(self, k: int) -> int:  # byte offset of the peer's free flag for its slot here
        return (self.peers_of_peer * self.K + self.ch._me * self.K + k) * 8

    def slot_offset(self, k: int, layout: "_Layout") -> int:  # our slot in the peer's in-region
        return (self.ch._me * self.K + k) * layout.capacity

    # ---- primitives -----------------------------------------------------------------------

    def stream(self) -> int:
        return torch.cuda.current_stream(self.ch._in.device).cuda_stream

    def wait_full(self, pi: int, k: int, layer: int) -> None:
        self.eng.wait_flag(self.watch, self.full_index(pi, k), layer, self.stream())

    def release(self, pi: int, k: int) -> None:
        """Tells peer pi its slot k here is free again (stream-ordered after our reads)."""
        p = self.ch._peers[pi]
        h = self.remote_flags[p]
        self.eng.put_message(p, h, [], [], h, self.free_at_peer(k), 1, self.stream(), True)
        self.held[pi][k] = False

    def release_held(self, k: int) -> None:
        for pi in range(self.P):
            if self.held[pi][k]:
                self.release(pi, k)

    def post(self, pi: int, k: int, layer: int, mb: int, layout: "_Layout", tensors: Sequence[torch.Tensor],
             rows: int, idx: torch.Tensor | None, direction: int, count_word: bool = True) -> None:
        """One message to peer pi: credit wait, copies, header words, full flag."""
        ch = self.ch
        p = ch._peers[pi]
        base = self.slot_offset(k, layout)
        i0, offs, _ = layout.fixed
        srcs: list[tuple[torch.Tensor, int]] = []  # (contiguous source, offset in the slot)
        if layout.routed and rows:
            srcs.append((idx, i0))
        for off, t in zip(offs, tensors):
            if rows:
                srcs.append((t, off))
        if not self.ipc[p] and srcs:
            # UCX posts later from the progress thread: move the rows into our own out slot
            # first (stream-ordered), which is not rewritten before the peer frees it.
            out = ch._out_slot(pi, k, layout)
            staged = []
            for t, off in srcs:
                nb = t.numel() * t.element_size()
                out[off : off + nb].copy_(t.reshape(-1).view(torch.uint8))
                staged.append((out[off:], off, nb))
            segs = [(s.data_ptr(), nb, base + off) for s, off, nb in staged]
        else:
            segs = [(t.data_ptr(), t.numel() * t.element_size(), base + off) for t, off in srcs]
        words = [(base, rows)] if count_word else []
        words.append((base + 8, check_word(layer, mb)))
        tag = ch._tag(direction, layer, mb, ch.mesh.rank, p)
        self.eng.put_message(p, self.remote_in[p].handle, segs, words, self.remote_flags[p], self.full_at_peer(k), 1,
                             self.stream(), True, tag, self.watch, self.free_index(pi, k), layer)

    # ---- views of the receive slots --------------------------------------------------------

    def views(self, k: int, layout: "_Layout", rows: int) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """``[P, rows, ...]`` views of section k of every peer's slot (fixed offsets)."""
        buf = self.ch._in
        i0, offs, _ = layout.fixed
        stride = self.K * layout.capacity
        idx = None
        if layout.routed:
            idx = _strided(buf, torch.int32, (self.P, rows), (stride, 4), k * layout.capacity + i0)
        out = []
        for spec, off in zip(layout.specs, offs):
            shape = (self.P, rows, *spec.shape)
            es = torch.empty((), dtype=spec.dtype).element_size()
            # byte strides: peer, row, then the row's own dims (contiguous)
            dims, acc = [], es
            for d in reversed(spec.shape):
                dims.insert(0, acc)
                acc *= d
            out.append(_strided(buf, spec.dtype, shape, (stride, spec.row_bytes, *dims), k * layout.capacity + off))
        return idx, out

    def counts(self, k: int, layout: "_Layout") -> tuple[torch.Tensor, torch.Tensor]:
        """Device int64 views ``[P]`` of the row-count and check words of slot k."""
        buf, stride = self.ch._in, self.K * layout.capacity
        n = _strided(buf, torch.int64, (self.P,), (stride,), k * layout.capacity)
        chk = _strided(buf, torch.int64, (self.P,), (stride,), k * layout.capacity + 8)
        return n, chk

    def verify(self, k: int, layout: "_Layout", layer: int, mb: int) -> list[int]:
        """Host copy of the row counts (a sync), checked against the header's check word."""
        n, chk = self.counts(k, layout)
        both = torch.stack([n, chk]).cpu().tolist()
        want = check_word(layer, mb)
        for pi, (rows, c) in enumerate(zip(*both)):
            if c != want or not 0 <= rows <= layout.max_rows:
                raise MeshError(
                    f"afdkit.mesh: rank {self.ch.mesh.rank} expected layer {layer} microbatch {mb} from rank "
                    f"{self.ch._peers[pi]} but its slot holds check word {c:#x} with {rows} rows: the ranks "
                    "disagree on the order of (layer, microbatch) calls, or a released (timed-out) wait let "
                    "stale data through")
        return both[0]

    def mark_consumed(self, pi: int, layer: int, mb: int, direction: int, nbytes: int) -> None:
        p = self.ch._peers[pi]
        self.eng.mark(self.ch._tag(direction, layer, mb, p, self.ch.mesh.rank), p, _CONSUMED, nbytes)

    def close(self) -> None:
        try:
            self.eng.unwatch_flags(self.watch)
        except (ValueError, RuntimeError):
            pass


def _strided(buf: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...], byte_strides: tuple[int, ...],
             byte_offset: int) -> torch.Tensor:
    """A ``dtype`` view of the uint8 buffer ``buf`` with strides and offset given in bytes."""
    es = torch.empty((), dtype=dtype).element_size()
    if byte_offset % es or any(s % es for s in byte_strides):
        raise MeshError(f"afdkit.mesh: misaligned {dtype} view (offset {byte_offset}, strides {byte_strides})")
    typed = buf.view(dtype)
    return typed.as_strided(shape, tuple(s // es for s in byte_strides), typed.storage_offset() + byte_offset // es)


__all__ = ["DeviceBatch", "FlagProtocol", "check_word"]
