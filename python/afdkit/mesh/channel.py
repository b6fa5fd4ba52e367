"""The AFD channel: per layer and microbatch, attention ranks send rows (hidden states,
scales, routing) to FFN ranks and receive their results back.

StepMesh's semantics without its pitfalls:

- **Slots.** Every (layer parity, microbatch) pair has a fixed, pre-registered slot per
  peer pair, sized from ``max_tokens`` at setup. A send larger than the slot raises
  ``ValueError`` before anything moves.
- **Credits.** A slot is rewritten only after its receiver acknowledged the previous
  message (a signal written back after it copied the rows out), so nothing is ever
  overwritten in flight: no loss, no duplication, no reordering within a key. Each
  message carries (sequence, layer, microbatch) and the receiver checks them.
- **Routing.** ``broadcast``: every FFN rank gets every row (tensor-parallel FFN).
  ``routed``: a row goes only to the FFN ranks named by a per-row mask ``[T, n_ffn]``
  or by its top-k expert ids through ``expert_map`` (expert-parallel FFN). Every lane
  carries a message per (layer, microbatch), possibly of zero rows, so the receiver
  always knows when it has everything.
- **Errors, not aborts.** Waits time out with ``MeshTimeout`` naming peer, layer and
  microbatch; a dead peer raises ``MeshPeerLost`` on every rank.
- **No leaks.** Per-request state lives from ``send`` to ``recv`` (attention) and from
  ``recv_batch`` to ``send_back`` (FFN), and at most one request per key.

Message layout in a slot: a 64-byte header (int64: seq, layer, microbatch, rows,
source rank, magic), then (routed) the int32 row indices, then each tensor's rows,
every section 16-byte aligned, packed for the actual row count so one put moves it.

On CUDA (``device="cuda:N"``) the channel runs the stream-ordered protocol of
:mod:`afdkit.mesh.channel_stream` instead: 0/1 flags instead of sequence numbers,
sections at fixed offsets, every step queued on the current stream (no host waits,
CUDA-graph-capturable over ``ipc``), and :meth:`AfdChannel.recv_batch_device` for FFN
ranks that take fixed-size views with device-side row counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from afdkit.mesh.channel_stream import DeviceBatch, FlagProtocol
from afdkit.mesh.core import Mesh
from afdkit.mesh.errors import MeshError

_MAGIC = 0x41464443  # "AFDC"
_HEADER = 64
_ALIGN = 16
_CONSUMED = 4  # TraceKind::kConsumed


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


@dataclass(frozen=True)
class TensorSpec:
    """One per-row tensor of a message: rows are dimension 0, ``shape`` the rest."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class ChannelConfig:
    max_tokens: int  # rows one attention rank sends per microbatch, at most
    send: tuple[TensorSpec, ...]  # attention -> FFN, per row
    recv: tuple[TensorSpec, ...]  # FFN -> attention, per row
    mode: str = "broadcast"  # or "routed"
    num_microbatches: int = 3
    name: str = "afd"
    device: str = "cpu"
    expert_map: tuple[int, ...] | None = None  # routed: expert id -> index into the FFN ranks
    timeout_s: float | None = None  # default: the mesh's
    num_layers: int | None = None  # when set, layer ids are range-checked
    # The stream-ordered flag protocol (channel_stream), opt-in: its first runs on H200s
    # failed (see docs/mesh.md, "Status"), so CUDA channels default to the host-waited
    # protocol that passed there. Every rank of a channel must use the same protocol
    # (checked at setup).
    stream_ordered: bool | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("broadcast", "routed"):
            raise ValueError(f"afdkit.mesh.ChannelConfig: mode must be 'broadcast' or 'routed', got {self.mode!r}")
        if self.max_tokens <= 0 or self.num_microbatches <= 0:
            raise ValueError("afdkit.mesh.ChannelConfig: max_tokens and num_microbatches must be positive")
        if not self.send or not self.recv:
            raise ValueError("afdkit.mesh.ChannelConfig: 'send' and 'recv' need at least one TensorSpec each")
        if self.stream_ordered and torch.device(self.device).type != "cuda":
            raise ValueError("afdkit.mesh.ChannelConfig: stream_ordered needs a CUDA device")


class _Layout:
    """Byte layout of one message with n rows of ``specs``."""

    def __init__(self, specs: Sequence[TensorSpec], routed: bool, max_tokens: int) -> None:
        self.specs, self.routed = tuple(specs), routed
        self.capacity = self.size(max_tokens)
        self.max_rows = max_tokens
        self.fixed = self.offsets(max_tokens)  # the stream-ordered protocol's fixed sections

    def offsets(self, n: int) -> tuple[int, list[int], int]:
        pos = _HEADER
        idx = pos
        if self.routed:
            pos += _align(4 * n)
        offs = []
        for s in self.specs:
            offs.append(pos)
            pos += _align(n * s.row_bytes)
        return idx, offs, pos

    def size(self, n: int) -> int:
        return self.offsets(n)[2]

    def pack(self, slot: torch.Tensor, header: list[int], idx: torch.Tensor | None,
             tensors: Sequence[torch.Tensor], rows: torch.Tensor | None) -> int:
        n = header[3]
        i0, offs, end = self.offsets(n)
        slot[:_HEADER].view(torch.int64)[:8].copy_(torch.tensor(header + [0] * (8 - len(header)), dtype=torch.int64))
        if self.routed and n:
            slot[i0 : i0 + 4 * n].view(torch.int32).copy_(idx)
        for s, off, t in zip(self.specs, offs, tensors):
            if n == 0:
                continue
            # Copy bytes: torch's CPU copy of fp8/bf16 elements is far slower than a memcpy.
            src = t.contiguous().view(torch.uint8).view(t.shape[0], s.row_bytes)
            if rows is not None:
                src = src.index_select(0, rows)
            slot[off : off + n * s.row_bytes].view(n, s.row_bytes).copy_(src)
        return end

    def unpack(self, slot: torch.Tensor, n: int) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """Copies of the row indices and tensors of a message of n rows in ``slot``."""
        i0, offs, _ = self.offsets(n)
        idx = slot[i0 : i0 + 4 * n].clone().view(torch.int32) if self.routed else None
        copies = [slot[off : off + n * s.row_bytes].clone().view(s.dtype).view(n, *s.shape)
                  for s, off in zip(self.specs, offs)]
        return idx, copies


@dataclass
class Batch:
    """What an FFN rank received for one (layer, microbatch), rows of all attention ranks
    concatenated in attention-rank order."""

    layer: int
    microbatch: int
    tensors: tuple[torch.Tensor, ...]  # one per ChannelConfig.send spec, [sum(counts), ...]
    sources: list[int]  # attention ranks, in order
    counts: list[int]  # rows from each (may differ, may be 0)
    row_index: list[torch.Tensor | None] = field(default_factory=list)  # routed: rows' ids at their sender

    @property
    def num_rows(self) -> int:
        return sum(self.counts)


def tag_of(direction: int, layer: int, mb: int, src: int, dst: int) -> int:
    """Trace id of a channel message: direction (0: A->F, 1: F->A), layer, microbatch, ranks."""
    return (direction << 62) | ((layer & 0xFFFFF) << 40) | ((mb & 0xFF) << 32) | ((src & 0xFFFF) << 16) | (dst & 0xFFFF)


class AfdChannel:
    """One rank's end of the A<->F exchange. Collective to construct (after
    ``mesh.connect``): it registers the slots and publishes them to the peers.

    Attention ranks call :meth:`send` and :meth:`recv`; FFN ranks call
    :meth:`recv_batch` and :meth:`send_back`, per (layer, microbatch) in the same order
    on every rank.
    """

    def __init__(self, mesh: Mesh, config: ChannelConfig) -> None:
        self.mesh, self.config = mesh, config
        self.att, self.ffn = mesh.ranks("attention"), mesh.ranks("ffn")
        if not self.att or not self.ffn:
            raise ValueError(f"afdkit.mesh.AfdChannel: needs attention and FFN ranks, got roles {mesh.roles}")
        if config.mode == "routed" and config.expert_map is not None:
            bad = [e for e in config.expert_map if not 0 <= e < len(self.ffn)]
            if bad:
                raise ValueError(f"afdkit.mesh.ChannelConfig: expert_map names FFN indices {bad} outside "
                                 f"[0, {len(self.ffn)})")
        self.is_attention = mesh.role == "attention"
        self._cuda = torch.device(config.device).type == "cuda"
        self.stream_ordered = self._cuda and bool(config.stream_ordered)
        self.K = 2 * config.num_microbatches  # slots per peer pair: (layer parity, microbatch)
        routed = config.mode == "routed"
        self.fwd = _Layout(config.send, routed, config.max_tokens)
        self.bwd = _Layout(config.recv, False, config.max_tokens)
        self.timeout_s = config.timeout_s if config.timeout_s is not None else mesh.config.timeout_s
        self._peers = self.ffn if self.is_attention else self.att
        self._me = (self.att if self.is_attention else self.ffn).index(mesh.rank)
        P, K = len(self._peers), self.K
        n = f"afd.{config.name}"
        # The signal region's name tells the peers which protocol this rank runs.
        self._in_name, self._sig_name = f"{n}.in", f"{n}.flags" if self.stream_ordered else f"{n}.sig"
        if self.is_attention:
            in_bytes, in_cap = P * K * self.bwd.capacity, self.bwd.capacity
            out_bytes = (P if routed or self.stream_ordered else 1) * K * self.fwd.capacity
        else:
            in_bytes, in_cap = P * K * self.fwd.capacity, self.fwd.capacity
            out_bytes = P * K * self.bwd.capacity
        dev = config.device
        self._in = mesh.alloc(self._in_name, in_bytes, dev)
        self._out = mesh.alloc(f"{n}.out", out_bytes, dev)
        self._sig = mesh.alloc(self._sig_name, 2 * P * K * 8, dev)
        self._in_cap = in_cap
        self._sig_region = {p: None for p in self._peers}
        self._sent = [[0] * K for _ in range(P)]  # messages written to each peer's slot
        self._got = [[0] * K for _ in range(P)]  # messages read from each peer's slot
        self._pending: dict[tuple[int, int], tuple[int, list[torch.Tensor | None]]] = {}
        self._batches: dict[tuple[int, int], Batch] = {}
        mesh.publish(f"channel/{config.name}")
        eng = mesh.engine
        for p in self._peers:
            try:
                mesh.remote(p, self._sig_name)
            except ValueError:
                raise MeshError(f"afdkit.mesh.AfdChannel '{config.name}': rank {p} runs the other protocol than rank "
                                f"{mesh.rank} (stream_ordered={self.stream_ordered}, device {config.device}); every "
                                "rank of a channel needs the same device type and stream_ordered setting") from None
        self._remote_in = {p: mesh.remote(p, self._in_name).handle for p in self._peers}
        self._remote_sig = {p: mesh.remote(p, self._sig_name).handle for p in self._peers}
        self._eng = eng
        self._fp = FlagProtocol(self, self._sig_name) if self.stream_ordered else None
        if self._fp is not None:
            self._warm_up_stream_kernels()

    _tag = staticmethod(tag_of)

    def _warm_up_stream_kernels(self) -> None:
        """Runs, once and on this rank's own memory, every kernel the stream-ordered
        calls launch, with the channel's real shapes.

        Why: with CUDA lazy loading (torch's default) the first launch of a kernel loads
        it, and loading synchronizes the context. If that happens while this rank's
        stream waits on a flag, the host blocks until the flag arrives -- and while it
        blocks, this process's progress thread cannot make CUDA calls either (UCX puts,
        the watchdog's release), so a UCX peer or a timed-out wait deadlocks. Loading
        the channel's kernels here, before any wait is queued, removes that. Kernels of
        the caller's own code have the same hazard (docs/mesh.md)."""
        T = self.config.max_tokens
        rows = torch.arange(min(T, 2), device=self.config.device)
        if self.is_attention:
            _, views = self._fp.views(0, self.bwd, T)
            parts = [(None, [v[0, :T] for v in views]), (rows, [v[0, : rows.numel()] for v in views])]
            self._reduce_sum(parts, T)
            [c.clone() for _, cs in parts for c in cs]
            for s in self.config.send:
                t = torch.zeros((T, *s.shape), dtype=s.dtype, device=self.config.device)
                t.contiguous().index_select(0, rows)
                self._out[: t.numel() * t.element_size()].copy_(t.reshape(-1).view(torch.uint8))
            rows.to(torch.int32)
        else:
            idx_v, views = self._fp.views(0, self.fwd, T)
            n, chk = self._fp.counts(0, self.fwd)
            torch.stack([n, chk]).cpu()
            [torch.cat([v[a, :T] for a in range(v.shape[0])]) for v in views]
            if idx_v is not None:
                idx_v[0, :T].to(torch.int64)
            for s in self.config.recv:
                t = torch.zeros((T, *s.shape), dtype=s.dtype, device=self.config.device)
                t.contiguous()
                self._out[: t.numel() * t.element_size()].copy_(t.reshape(-1).view(torch.uint8))
        torch.cuda.synchronize(self.config.device)

    def _out_slot(self, pi: int, k: int, layout: _Layout) -> torch.Tensor:
        """This rank's own staging slot for peer pi's slot k (stream-ordered protocol)."""
        base = (pi * self.K + k) * layout.capacity
        return self._out[base : base + layout.capacity]

    @property
    def graph_safe(self) -> bool:
        """True when send/recv/recv_batch_device/send_back are pure stream work that a CUDA
        graph can capture: the stream-ordered protocol with every peer over ipc."""
        return self._fp is not None and self._fp.graph_safe

    def close(self) -> None:
        """Stops the watchdog of this channel's flags (the mesh keeps its memory)."""
        if self._fp is not None:
            self._fp.close()

    # ---- keys and offsets ---------------------------------------------------------------

    def _key(self, layer: int, mb: int, op: str) -> int:
        c = self.config
        if not isinstance(layer, int) or not isinstance(mb, int):
            raise TypeError(f"afdkit.mesh.{op}: layer and microbatch must be ints, got {layer!r}, {mb!r}")
        if not 0 <= mb < c.num_microbatches:
            raise ValueError(f"afdkit.mesh.{op}: unknown microbatch {mb} (the channel has {c.num_microbatches})")
        if layer < 0 or (c.num_layers is not None and layer >= c.num_layers):
            raise ValueError(f"afdkit.mesh.{op}: unknown layer {layer}"
                             + (f" (the channel has {c.num_layers})" if c.num_layers else ""))
        return (layer % 2) * c.num_microbatches + mb

    def _recv_sig_off(self, pi: int, k: int) -> int:  # at this rank: data signal from peer pi
        return (pi * self.K + k) * 8

    def _ack_off(self, pi: int, k: int) -> int:  # at this rank: ack from peer pi of our slot k
        return (len(self._peers) * self.K + pi * self.K + k) * 8

    def _my_ack_off_at_peer(self, k: int) -> int:  # at the peer: where our ack for its slot k goes
        peers_of_peer = len(self.att if self.is_attention else self.ffn)
        return (peers_of_peer * self.K + self._me * self.K + k) * 8

    def _stream(self) -> int:
        return torch.cuda.current_stream().cuda_stream if self._cuda else 0

    def _wait(self, offset: int, value: int, peer: int, what: str, tag: int = 0) -> None:
        ptr = self._sig.data_ptr() + offset
        self._eng.wait(ptr, value, self.timeout_s, peer, what, tag, self._cuda)

    # ---- shared send/receive steps ---------------------------------------------------------

    def _post(self, pi: int, k: int, slot: torch.Tensor, nbytes: int, in_layout: _Layout, tag: int) -> None:
        """Writes our packed message into peer pi's slot k, then its signal."""
        peer = self._peers[pi]
        seq = self._sent[pi][k] + 1
        dst = (self._me * self.K + k) * in_layout.capacity
        self._eng.put(slot.data_ptr(), nbytes, peer, self._remote_in[peer], dst, self._remote_sig[peer],
                      (self._me * self.K + k) * 8, seq, self._stream(), tag, False, self._cuda)
        self._sent[pi][k] = seq

    def _await_credit(self, pi: int, k: int, layer: int, mb: int) -> None:
        """Blocks until peer pi consumed our previous message in slot k."""
        prev = self._sent[pi][k]
        if prev:
            self._wait(self._ack_off(pi, k), prev, self._peers[pi],
                       f"the slot of layer {layer} microbatch {mb} to be released (previous message consumed)")

    def _take(self, pi: int, k: int, layer: int, mb: int, layout: _Layout, direction: int) -> tuple:
        """Waits for peer pi's next message in slot k; returns (rows, index, copies)."""
        peer = self._peers[pi]
        seq = self._got[pi][k] + 1
        tag = tag_of(direction, layer, mb, peer, self.mesh.rank)
        side = "results" if direction else "rows"
        self._wait(self._recv_sig_off(pi, k), seq, peer, f"the {side} of layer {layer} microbatch {mb}", tag)
        slot = self._in[(pi * self.K + k) * layout.capacity : (pi * self.K + k + 1) * layout.capacity]
        hdr = slot[:_HEADER].view(torch.int64)[:6].tolist()
        if hdr[5] != _MAGIC or hdr[0] != seq or hdr[1] != layer or hdr[2] != mb:
            raise MeshError(f"afdkit.mesh: rank {self.mesh.rank} expected message {seq} of layer {layer} microbatch "
                            f"{mb} from rank {peer} but found seq {hdr[0]} layer {hdr[1]} microbatch {hdr[2]}: "
                            "the ranks disagree on the order of (layer, microbatch) calls")
        n = hdr[3]
        idx, copies = layout.unpack(slot, n)
        idx = None if idx is None else idx.to(torch.int64)
        self._got[pi][k] = seq
        # Release the slot: the writer may now reuse it (stream-ordered after the copies on GPU).
        self._eng.put(0, 0, peer, self._remote_sig[peer], 0, self._remote_sig[peer], self._my_ack_off_at_peer(k), seq,
                      self._stream(), 0, True, self._cuda)
        self._eng.mark(tag, peer, _CONSUMED, layout.size(n))
        return n, idx, copies

    def _check_tensors(self, op: str, specs: Sequence[TensorSpec], tensors: Sequence[torch.Tensor],
                       rows: int | None = None, limit: int | None = None) -> int:
        if len(tensors) != len(specs):
            raise ValueError(f"afdkit.mesh.{op}: expected {len(specs)} tensor(s) ({[s.name for s in specs]}), "
                             f"got {len(tensors)}")
        n = tensors[0].shape[0] if tensors[0].dim() else -1
        for s, t in zip(specs, tensors):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"afdkit.mesh.{op}: '{s.name}' must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype != s.dtype:
                raise TypeError(f"afdkit.mesh.{op}: '{s.name}' must have dtype {s.dtype}, got {t.dtype}")
            if tuple(t.shape[1:]) != tuple(s.shape) or t.shape[0] != n:
                raise ValueError(f"afdkit.mesh.{op}: '{s.name}' must have shape [{n}, {', '.join(map(str, s.shape))}]"
                                 f", got {list(t.shape)}")
            if t.device.type != torch.device(self.config.device).type:
                raise ValueError(f"afdkit.mesh.{op}: '{s.name}' is on {t.device}, the channel on {self.config.device}")
        if rows is not None and n != rows:
            raise ValueError(f"afdkit.mesh.{op}: expected {rows} rows (what recv_batch returned), got {n}")
        limit = self.config.max_tokens if limit is None else limit
        if n > limit:
            raise ValueError(f"afdkit.mesh.{op}: {n} rows exceed the channel's max_tokens {limit}; nothing was sent")
        return n

    # ---- attention side ---------------------------------------------------------------------

    def _routes(self, routing: torch.Tensor | None, n: int) -> list[torch.Tensor | None]:
        """Per FFN rank, the rows it gets (None: all rows)."""
        N = len(self.ffn)
        if self.config.mode == "broadcast":
            if routing is not None:
                raise ValueError("afdkit.mesh.send: a broadcast channel takes no routing")
            return [None] * N
        if routing is None:
            raise ValueError("afdkit.mesh.send: a routed channel needs routing (a [T, n_ffn] bool mask or [T, k] "
                             "expert ids)")
        routing = routing.to("cpu")
        if routing.dtype == torch.bool:
            if tuple(routing.shape) != (n, N):
                raise ValueError(f"afdkit.mesh.send: the routing mask must be [{n}, {N}], got {list(routing.shape)}")
            mask = routing
        else:
            if self.config.expert_map is None:
                raise ValueError("afdkit.mesh.send: routing by expert ids needs ChannelConfig.expert_map")
            if routing.dim() != 2 or routing.shape[0] != n:
                raise ValueError(f"afdkit.mesh.send: expert ids must be [{n}, k], got {list(routing.shape)}")
            emap = torch.tensor(self.config.expert_map, dtype=torch.int64)
            ids = routing.to(torch.int64)
            if n and (ids.min() < 0 or ids.max() >= len(emap)):
                raise ValueError(f"afdkit.mesh.send: expert ids must lie in [0, {len(emap)})")
            mask = torch.zeros(n, N, dtype=torch.bool)
            mask.scatter_(1, emap[ids], True)
        dev = torch.device(self.config.device)
        return [mask[:, f].nonzero().flatten().to(dev) for f in range(N)]

    def send(self, layer: int, microbatch: int, hidden: torch.Tensor | Sequence[torch.Tensor],
             routing: torch.Tensor | None = None) -> None:
        """Attention: sends this microbatch's rows (one tensor per ``config.send`` spec)."""
        if not self.is_attention:
            raise MeshError("afdkit.mesh.send: only attention ranks send; FFN ranks call send_back")
        k = self._key(layer, microbatch, "send")
        tensors = [hidden] if isinstance(hidden, torch.Tensor) else list(hidden)
        n = self._check_tensors("send", self.config.send, tensors)
        routes = self._routes(routing, n)
        if (layer, microbatch) in self._pending:
            raise ValueError(f"afdkit.mesh.send: layer {layer} microbatch {microbatch} was already sent and not "
                             "received back")
        if self._fp is not None:
            self._send_stream(k, layer, microbatch, tensors, n, routes)
            return
        for fi in range(len(self.ffn)):
            self._await_credit(fi, k, layer, microbatch)
        cap = self.fwd.capacity
        for fi, f in enumerate(self.ffn):
            rows = routes[fi]
            base = (fi * self.K + k) * cap if self.config.mode == "routed" else k * cap
            slot = self._out[base : base + cap]
            m = n if rows is None else int(rows.numel())
            if rows is not None or fi == 0:  # broadcast: pack once, post to every FFN rank
                header = [self._sent[fi][k] + 1, layer, microbatch, m, self.mesh.rank, _MAGIC]
                nbytes = self.fwd.pack(slot, header, None if rows is None else rows.to(torch.int32), tensors, rows)
            else:
                header_seq = self._sent[fi][k] + 1
                if header_seq != self._sent[0][k]:
                    raise MeshError("afdkit.mesh.send: broadcast slots out of step between FFN ranks")
            self._post(fi, k, slot, nbytes, self.fwd, tag_of(0, layer, microbatch, self.mesh.rank, f))
        self._pending[(layer, microbatch)] = (n, routes)

    def _send_stream(self, k: int, layer: int, mb: int, tensors: list[torch.Tensor], n: int,
                     routes: list[torch.Tensor | None]) -> None:
        fp = self._fp
        fp.release_held(k)  # results of this key handed out as views by recv(reduce="views")
        dense = [t.contiguous() for t in tensors]
        for fi in range(len(self.ffn)):
            rows = routes[fi]
            if rows is None:
                fp.post(fi, k, layer, mb, self.fwd, dense, n, None, 0)
            else:
                # Routed: the selected rows are gathered (index_select) before the copy.
                fp.post(fi, k, layer, mb, self.fwd, [t.index_select(0, rows) for t in dense], int(rows.numel()),
                        rows.to(torch.int32), 0)
        self._pending[(layer, mb)] = (n, routes)

    def recv(self, layer: int, microbatch: int, reduce: str | None = "sum"):
        """Attention: the FFN results for the rows sent with ``send(layer, microbatch)``.

        ``reduce="sum"``: the partial results of all FFN ranks added per row (fp32
        accumulation), a tensor per ``config.recv`` spec of ``[T, ...]`` (a single tensor
        when there is one spec). ``reduce=None``: per FFN rank, ``(row_index, tensors)``
        with row_index None in broadcast mode. ``reduce="views"`` (stream-ordered channels):
        like None but the tensors are views of the receive slots, valid until the next
        ``send`` of the same (layer parity, microbatch) -- no copy.

        On a stream-ordered (CUDA) channel nothing here blocks the host: the results are
        waited for on the current stream.
        """
        if not self.is_attention:
            raise MeshError("afdkit.mesh.recv: only attention ranks call recv; FFN ranks call recv_batch")
        if reduce not in ("sum", None, "views"):
            raise ValueError(f"afdkit.mesh.recv: reduce must be 'sum', None or 'views', got {reduce!r}")
        if reduce == "views" and self._fp is None:
            raise ValueError("afdkit.mesh.recv: reduce='views' needs a stream-ordered (CUDA) channel")
        k = self._key(layer, microbatch, "recv")
        try:
            n, routes = self._pending.pop((layer, microbatch))
        except KeyError:
            raise ValueError(f"afdkit.mesh.recv: nothing was sent for layer {layer} microbatch {microbatch} "
                             "(or it was already received)") from None
        if self._fp is not None:
            return self._recv_stream(k, layer, microbatch, n, routes, reduce)
        parts = []
        for fi in range(len(self.ffn)):
            m, _, copies = self._take(fi, k, layer, microbatch, self.bwd, 1)
            want = n if routes[fi] is None else int(routes[fi].numel())
            if m != want:
                raise MeshError(f"afdkit.mesh.recv: rank {self.ffn[fi]} returned {m} rows for layer {layer} "
                                f"microbatch {microbatch}, expected {want}")
            parts.append((routes[fi], copies))
        if reduce is None:
            return parts
        return self._reduce_sum(parts, n)

    def _recv_stream(self, k: int, layer: int, mb: int, n: int, routes: list[torch.Tensor | None],
                     reduce: str | None):
        fp = self._fp
        for fi in range(len(self.ffn)):
            fp.wait_full(fi, k, layer)
        _, views = fp.views(k, self.bwd, self.config.max_tokens)
        parts = []
        for fi in range(len(self.ffn)):
            m = n if routes[fi] is None else int(routes[fi].numel())
            parts.append((routes[fi], [v[fi, :m] for v in views]))
            fp.mark_consumed(fi, layer, mb, 1, self.bwd.size(m))
        if reduce == "views":
            for fi in range(len(self.ffn)):
                fp.held[fi][k] = True
            return parts
        out = [(r, [c.clone() for c in cs]) for r, cs in parts] if reduce is None else self._reduce_sum(parts, n)
        for fi in range(len(self.ffn)):
            fp.release(fi, k)  # stream-ordered after the copies / sums above
        return out

    def _reduce_sum(self, parts: list, n: int):
        outs = []
        for si, s in enumerate(self.config.recv):
            acc = torch.zeros((n, *s.shape), dtype=torch.float32, device=self.config.device)
            for rows, copies in parts:
                if rows is None:
                    acc += copies[si].float()
                elif rows.numel():
                    acc.index_add_(0, rows, copies[si].float())
            outs.append(acc.to(s.dtype))
        return outs[0] if len(outs) == 1 else tuple(outs)

    # ---- FFN side -----------------------------------------------------------------------------

    def recv_batch(self, layer: int, microbatch: int) -> Batch:
        """FFN: the rows every attention rank sent for (layer, microbatch)."""
        if self.is_attention:
            raise MeshError("afdkit.mesh.recv_batch: only FFN ranks call recv_batch")
        k = self._key(layer, microbatch, "recv_batch")
        if (layer, microbatch) in self._batches:
            raise ValueError(f"afdkit.mesh.recv_batch: layer {layer} microbatch {microbatch} was received and not "
                             "yet answered with send_back")
        if self._fp is not None:
            batch = self._recv_batch_stream(k, layer, microbatch)
            self._batches[(layer, microbatch)] = batch
            return batch
        counts, idxs, per_spec = [], [], [[] for _ in self.config.send]
        for ai in range(len(self.att)):
            m, idx, copies = self._take(ai, k, layer, microbatch, self.fwd, 0)
            counts.append(m)
            idxs.append(idx)
            for si, c in enumerate(copies):
                per_spec[si].append(c)
        tensors = tuple(torch.cat(p) if len(p) > 1 else p[0] for p in per_spec)
        batch = Batch(layer, microbatch, tensors, list(self.att), counts, idxs)
        self._batches[(layer, microbatch)] = batch
        return batch

    def _recv_batch_stream(self, k: int, layer: int, mb: int) -> Batch:
        """Stream waits, then one host sync to learn the row counts (the Batch API needs them)."""
        fp = self._fp
        for ai in range(len(self.att)):
            fp.wait_full(ai, k, layer)
        counts = fp.verify(k, self.fwd, layer, mb)
        idx_v, views = fp.views(k, self.fwd, self.config.max_tokens)
        tensors = tuple(torch.cat([v[ai, : counts[ai]] for ai in range(len(self.att))]) for v in views)
        idxs = [idx_v[ai, : counts[ai]].to(torch.int64) if idx_v is not None else None for ai in range(len(self.att))]
        for ai in range(len(self.att)):
            fp.mark_consumed(ai, layer, mb, 0, self.fwd.size(counts[ai]))
            fp.release(ai, k)  # after the copies above, in stream order
        return Batch(layer, mb, tensors, list(self.att), counts, idxs)

    def recv_batch_device(self, layer: int, microbatch: int) -> DeviceBatch:
        """FFN, stream-ordered channels: the rows of every attention rank as fixed-size views
        ``[n_attention, max_tokens, ...]`` of the receive slots plus the row counts as a
        device tensor -- no host sync, no copy, CUDA-graph-capturable over ipc. Answer it
        with :meth:`send_back` of ``[n_attention, max_tokens, ...]`` results (every slot row
        is sent back; each attention rank reads its own count of them)."""
        if self.is_attention:
            raise MeshError("afdkit.mesh.recv_batch_device: only FFN ranks call recv_batch_device")
        if self._fp is None:
            raise MeshError("afdkit.mesh.recv_batch_device: needs a stream-ordered (CUDA) channel")
        k = self._key(layer, microbatch, "recv_batch_device")
        if (layer, microbatch) in self._batches:
            raise ValueError(f"afdkit.mesh.recv_batch_device: layer {layer} microbatch {microbatch} was received "
                             "and not yet answered with send_back")
        fp = self._fp
        for ai in range(len(self.att)):
            fp.wait_full(ai, k, layer)
            fp.held[ai][k] = True
        idx_v, views = fp.views(k, self.fwd, self.config.max_tokens)
        counts, _ = fp.counts(k, self.fwd)
        batch = DeviceBatch(layer, microbatch, tuple(views), counts, list(self.att), idx_v)
        self._batches[(layer, microbatch)] = batch
        return batch

    def _send_back_device(self, k: int, batch: DeviceBatch, tensors: list[torch.Tensor]) -> None:
        A, T = len(self.att), self.config.max_tokens
        shaped = []
        for s, t in zip(self.config.recv, tensors):
            if not isinstance(t, torch.Tensor) or t.dtype != s.dtype:
                raise TypeError(f"afdkit.mesh.send_back: '{s.name}' must be a {s.dtype} tensor")
            if t.device.type != "cuda":
                raise ValueError(f"afdkit.mesh.send_back: '{s.name}' is on {t.device}, the channel on CUDA")
            if tuple(t.shape) not in ((A, T, *s.shape), (A * T, *s.shape)):
                raise ValueError(f"afdkit.mesh.send_back: after recv_batch_device '{s.name}' must be "
                                 f"[{A}, {T}, {', '.join(map(str, s.shape))}] (every slot row), got {list(t.shape)}")
            shaped.append(t.contiguous().view(A, T, *s.shape))
        del self._batches[(batch.layer, batch.microbatch)]
        for ai in range(A):
            self._fp.post(ai, k, batch.layer, batch.microbatch, self.bwd, [t[ai] for t in shaped], T, None, 1,
                          count_word=False)
        self._fp.release_held(k)  # the rows' slots: whatever read them is queued before this

    def send_back(self, layer: int, microbatch: int, results: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """FFN: returns results for the rows of ``recv_batch(layer, microbatch)``, in the
        same order; each attention rank gets exactly its own rows."""
        if self.is_attention:
            raise MeshError("afdkit.mesh.send_back: only FFN ranks call send_back")
        k = self._key(layer, microbatch, "send_back")
        batch = self._batches.get((layer, microbatch))
        if batch is None:
            raise ValueError(f"afdkit.mesh.send_back: no batch of layer {layer} microbatch {microbatch} is pending "
                             "(call recv_batch first)")
        tensors = [results] if isinstance(results, torch.Tensor) else list(results)
        if isinstance(batch, DeviceBatch):
            if len(tensors) != len(self.config.recv):
                raise ValueError(f"afdkit.mesh.send_back: expected {len(self.config.recv)} tensor(s), got {len(tensors)}")
            self._send_back_device(k, batch, tensors)
            return
        self._check_tensors("send_back", self.config.recv, tensors, rows=batch.num_rows,
                            limit=len(self.att) * self.config.max_tokens)
        del self._batches[(layer, microbatch)]
        if self._fp is not None:
            start = 0
            for ai in range(len(self.att)):
                m = batch.counts[ai]
                self._fp.post(ai, k, layer, microbatch, self.bwd, [t[start : start + m].contiguous() for t in tensors],
                              m, None, 1)
                start += m
            return
        start = 0
        cap = self.bwd.capacity
        for ai, a in enumerate(self.att):
            m = batch.counts[ai]
            self._await_credit(ai, k, layer, microbatch)
            slot = self._out[(ai * self.K + k) * cap : (ai * self.K + k + 1) * cap]
            header = [self._sent[ai][k] + 1, layer, microbatch, m, self.mesh.rank, _MAGIC]
            nbytes = self.bwd.pack(slot, header, None, [t[start : start + m] for t in tensors], None)
            self._post(ai, k, slot, nbytes, self.bwd, tag_of(1, layer, microbatch, self.mesh.rank, a))
            start += m

    def pending(self) -> dict[str, int]:
        """How many requests are open (for leak checks): sends awaiting recv, batches awaiting send_back."""
        return {"sent": len(self._pending), "batches": len(self._batches)}


__all__ = ["AfdChannel", "ChannelConfig", "TensorSpec", "Batch", "DeviceBatch", "tag_of"]
