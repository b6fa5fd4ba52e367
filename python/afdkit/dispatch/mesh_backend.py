"""Expert-parallel dispatch/combine over :class:`afdkit.mesh.Mesh` (CPU, cross-host).

Every rank of the mesh sends tokens and owns ``num_experts / ranks`` experts (rank ``r``
owns ``[r * E_local, (r + 1) * E_local)``). The output follows the contract of
:mod:`afdkit.dispatch.types`; :func:`afdkit.dispatch.reference.reference_dispatch` and
``reference_combine`` compute the same values.

Wire protocol, per call and per pair of ranks (also zero-row messages, so a receiver
always knows when it has everything):

- **dispatch** ``s -> d``: one row per token of ``s`` that chose at least one expert of
  ``d`` (a token picking two experts of one rank crosses once), in token order: source
  index (int32), the token's top-k ids (int32) and weights (fp32), its FP8 codes (or
  bf16 values) and its per-128-channel fp32 scales. ``d`` lays the rows out
  expert-major itself.
- **combine** ``d -> s``: one bf16 row per row ``s`` sent to ``d``: the token's weighted
  sum over ``d``'s experts, accumulated in fp32 in row order. ``s`` adds the rows of all
  ranks in fp32 in rank order and rounds to bf16 once more.

Each message is packed into a staging slot, then moved by one put whose signal (the
call's sequence number) lands after the data. Messages carry a 64-byte header (sequence
number, rows, source rank, magic) that the receiver checks. Slots: ``depth`` per pair of
ranks and direction, fixed and registered at construction; a call takes the lowest
slot no open dispatch holds, so up to ``depth`` dispatches can await their combine and
back-to-back calls never share a slot. A slot is rewritten only after its reader
acknowledged the previous message in it (a zero-byte put carrying a signal). All ranks
must call dispatch and combine for the same handles in the same order (collectives).

Failures: every wait has the mesh's timeout (``MeshTimeout``) and notices lost peers
(``MeshPeerLost``). After a failure the dispatcher refuses further calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from afdkit.dispatch import validate as val
from afdkit.dispatch.types import DispatchOutput
from afdkit.mesh.core import Mesh
from afdkit.mesh.errors import MeshError

_HEADER = 64
_ALIGN = 16
_MAGIC_DISPATCH = 0x44495350  # "DISP"
_MAGIC_COMBINE = 0x434F4D42  # "COMB"
# Signal words at each rank, per (kind, peer, slot): data arrived / our message consumed.
_DISPATCH_IN, _DISPATCH_ACK, _COMBINE_IN, _COMBINE_ACK = range(4)


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


@dataclass(frozen=True)
class _DispatchLayout:
    """Byte offsets of a dispatch message of n rows: header, index, ids, weights, tokens, scales."""

    top_k: int
    token_bytes: int  # per row: hidden bytes (fp8) or 2 * hidden (bf16)
    scale_cols: int  # per row: hidden / 128 fp32 scales (fp8), else 0

    def offsets(self, n: int) -> list[int]:
        sizes = [4 * n, 4 * n * self.top_k, 4 * n * self.top_k, n * self.token_bytes, 4 * n * self.scale_cols]
        offs, pos = [], _HEADER
        for s in sizes:
            offs.append(pos)
            pos += _align(s)
        return offs + [pos]

    def size(self, n: int) -> int:
        return self.offsets(n)[-1]


@dataclass
class MeshHandle:
    """What combine needs from one dispatch call (see :class:`MeshDispatcher`)."""

    seq: int
    slot: int
    num_tokens: int
    send_rows: list[torch.Tensor]  # per destination rank: the token indices sent there, ascending
    recv_rows: list[int]  # per source rank: rows its message had
    row_of_pair: torch.Tensor  # [sum recv_rows, kmax] int64: output row of (message row, l-th local expert)
    valid: torch.Tensor  # [sum recv_rows, kmax] bool
    pair_weight: torch.Tensor  # [sum recv_rows, kmax] fp32
    src_rank: torch.Tensor  # [num_rows] int64, per output row
    src_index: torch.Tensor  # [num_rows] int64, per output row
    weight: torch.Tensor  # [num_rows] fp32, per output row
    combined: bool = field(default=False)

    @property
    def num_rows(self) -> int:
        return int(self.src_rank.numel())


class MeshDispatcher:
    """Dispatch/combine among all ranks of a connected mesh. Collective to construct
    (it registers and publishes its buffers), as are :meth:`dispatch` and :meth:`combine`.

    ``dispatch`` returns a :class:`DispatchOutput` whose tensors are views of fixed
    buffers: they stay valid until the slot is reused, i.e. after its combine and
    ``depth`` more dispatches at the earliest.
    """

    def __init__(self, mesh: Mesh, num_experts: int, max_tokens_per_rank: int, hidden: int, top_k: int,
                 quant: str = "fp8", device: str | torch.device | None = None, *, depth: int = 2,
                 timeout_s: float | None = None, check_ids: bool = True, name: str = "moe") -> None:
        op = "afdkit.dispatch.MeshDispatcher"
        if not isinstance(mesh, Mesh):
            raise TypeError(f"{op}: 'mesh' must be an afdkit.mesh.Mesh, got {type(mesh).__name__}")
        if not mesh.roles:
            raise MeshError(f"{op}: connect the mesh first (mesh.connect(store, secret))")
        ranks = mesh.world_size
        val.validate_config(op, num_experts, ranks, max_tokens_per_rank, hidden, top_k, quant)
        if depth < 1:
            raise ValueError(f"{op}: depth must be >= 1, got {depth}")
        if device is None:
            device = "cpu" if mesh.config.device is None else f"cuda:{mesh.config.device}"
        self.mesh, self.rank, self.ranks = mesh, mesh.rank, ranks
        self.num_experts, self.max_tokens, self.hidden, self.top_k = num_experts, max_tokens_per_rank, hidden, top_k
        self.quant, self.device, self.depth = quant, torch.device(device), depth
        self.check_ids = check_ids
        self.timeout_s = mesh.config.timeout_s if timeout_s is None else float(timeout_s)
        self.num_local_experts = num_experts // ranks
        self.kmax = min(top_k, self.num_local_experts)
        self.capacity = val.receive_capacity(ranks, max_tokens_per_rank, top_k, self.num_local_experts)
        fp8 = quant == "fp8"
        self._layout = _DispatchLayout(top_k, hidden * (1 if fp8 else 2), hidden // val.FP8_GROUP if fp8 else 0)
        self._dispatch_cap = self._layout.size(max_tokens_per_rank)
        self._combine_cap = _HEADER + _align(2 * hidden * max_tokens_per_rank)
        self._names = {k: f"dispatch.{name}.{k}" for k in ("din", "dout", "cin", "cout", "sig")}
        slots = ranks * depth
        self._din = mesh.alloc(self._names["din"], slots * self._dispatch_cap, self.device)
        self._dout = mesh.alloc(self._names["dout"], slots * self._dispatch_cap, self.device)
        self._cin = mesh.alloc(self._names["cin"], slots * self._combine_cap, self.device)
        self._cout = mesh.alloc(self._names["cout"], slots * self._combine_cap, self.device)
        self._sig = mesh.alloc(self._names["sig"], 4 * slots * 8, self.device)
        self._out = [self._output_buffers() for _ in range(depth)]
        self._slot_seq = [0] * depth  # the last call whose dispatch used each slot
        self._combined_seq = [0] * depth  # the last call whose combine used each slot
        self._open: dict[int, MeshHandle] = {}  # slot -> handle of a dispatch awaiting combine
        self._seq = 0
        self._failed: BaseException | None = None
        mesh.publish(f"dispatch/{name}")

    def _output_buffers(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        dev, cap, h = self.device, self.capacity, self.hidden
        fp8 = self.quant == "fp8"
        tokens = torch.zeros(cap, h, dtype=torch.float8_e4m3fn if fp8 else torch.bfloat16, device=dev)
        scales = torch.zeros(cap, h // val.FP8_GROUP, dtype=torch.float32, device=dev) if fp8 else None
        counts = torch.zeros(self.num_local_experts, dtype=torch.int32, device=dev)
        offsets = torch.zeros(self.num_local_experts + 1, dtype=torch.int32, device=dev)
        return tokens, scales, counts, offsets

    # ---- helpers -------------------------------------------------------------------------

    def _word(self, kind: int, peer: int, slot: int) -> int:
        return ((kind * self.ranks + peer) * self.depth + slot) * 8

    def _stream(self) -> int | None:
        return torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else None

    def _slot_bytes(self, buf: torch.Tensor, cap: int, peer: int, slot: int) -> torch.Tensor:
        base = (peer * self.depth + slot) * cap
        return buf[base:base + cap]

    def _wait(self, kind: int, peer: int, slot: int, value: int, what: str) -> None:
        self.mesh.wait(self._names["sig"], self._word(kind, peer, slot), value, timeout_s=self.timeout_s, peer=peer,
                       what=f"{what} (rank {self.rank} waiting on rank {peer})")

    def _ack(self, kind: int, peer: int, slot: int, seq: int) -> None:
        """Tells ``peer`` that its message of call ``seq`` in ``slot`` was consumed.

        Best effort: a peer that already left (closed its mesh after its last call) needs
        no acknowledgement; a lost one is reported by the next wait on it."""
        sig = self.mesh.remote(peer, self._names["sig"]).handle
        stream = self._stream()
        self.mesh.engine.put(self._sig.data_ptr(), 0, peer, sig, 0, sig, self._word(kind, self.rank, slot), seq,
                             stream or 0, 0, True, stream is not None)

    def _header(self, slot: torch.Tensor, seq: int, rows: int, magic: int) -> None:
        hdr = torch.tensor([seq, rows, self.rank, magic, 0, 0, 0, 0], dtype=torch.int64)
        slot[:_HEADER].view(torch.int64).copy_(hdr)

    def _read_header(self, slot: torch.Tensor, seq: int, src: int, magic: int, what: str) -> int:
        got_seq, rows, got_src, got_magic = slot[:_HEADER].view(torch.int64)[:4].tolist()
        if got_magic != magic or got_seq != seq or got_src != src:
            raise MeshError(f"afdkit.dispatch: rank {self.rank} expected {what} call {seq} from rank {src} but found "
                            f"call {got_seq} from rank {got_src} (magic {got_magic:#x}): the ranks disagree on the "
                            "order of dispatch/combine calls")
        return rows

    def _guard(self, op: str) -> None:
        if self._failed is not None:
            raise MeshError(f"{op}: this dispatcher failed earlier ({type(self._failed).__name__}: {self._failed}); "
                            "create a new mesh and dispatcher")

    def _run(self, fn: Callable, *args):
        try:
            return fn(*args)
        except BaseException as exc:
            self._failed = exc
            raise

    # ---- dispatch --------------------------------------------------------------------------

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, *,
                 check_ids: bool | None = None,
                 return_recv_hook: bool = False) -> DispatchOutput | Callable[[], DispatchOutput]:
        """Sends each token once to every rank that owns one of its experts and returns
        this rank's expert-major rows. ``return_recv_hook=True`` returns after sending;
        calling the returned hook (once) receives. Other calls may run in between if every
        rank makes them in the same order."""
        op = "afdkit.dispatch.MeshDispatcher.dispatch"
        self._guard(op)
        slot = val.validate_dispatch_call(op, self, x, topk_ids, topk_weights, check_ids, self._open)
        self._seq += 1
        seq = self._seq
        prev = self._slot_seq[slot]
        self._slot_seq[slot] = seq
        send_rows = self._run(self._send_dispatch, x, topk_ids, topk_weights, seq, slot, prev)
        handle_box: list[MeshHandle] = []
        self._open[slot] = None  # type: ignore[assignment]  # reserved until the receive fills it

        def receive() -> DispatchOutput:
            if handle_box:
                raise ValueError(f"{op}: this receive hook was already called")
            out, handle = self._run(self._receive_dispatch, seq, slot, x.shape[0], send_rows)
            handle_box.append(handle)
            self._open[slot] = handle
            return out

        return receive if return_recv_hook else receive()

    def _send_dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, seq: int, slot: int,
                       prev: int) -> list[torch.Tensor]:
        from afdkit.quant import quantize_fp8

        ids = topk_ids.to(torch.int32)
        dest = ids.long() // self.num_local_experts
        mask = torch.zeros(x.shape[0], self.ranks, dtype=torch.bool, device=x.device)
        if x.shape[0]:
            mask.scatter_(1, dest, True)
        if self.quant == "fp8" and x.shape[0] == 0:  # no kernel launch for an empty batch
            codes = torch.empty(0, self.hidden, dtype=torch.float8_e4m3fn, device=x.device)
            scales = torch.empty(0, self.hidden // val.FP8_GROUP, dtype=torch.float32, device=x.device)
        elif self.quant == "fp8":
            codes, scales = quantize_fp8(x, "channel128")
        else:
            codes, scales = x.contiguous(), None
        token_bytes = codes.view(torch.uint8).view(x.shape[0], self._layout.token_bytes)
        weights = topk_weights.contiguous()
        send_rows = []
        for step in range(self.ranks):
            d = (self.rank + 1 + step) % self.ranks  # every rank starts with a different peer
            rows = mask[:, d].nonzero().flatten()
            n = int(rows.numel())
            if d != self.rank and prev:
                self._wait(_DISPATCH_ACK, d, slot, prev, f"the dispatch slot {slot} to be released (call {prev} read)")
            buf = self._slot_bytes(self._dout, self._dispatch_cap, d, slot)
            self._pack_dispatch(buf, seq, rows, ids, weights, token_bytes, scales)
            if d != self.rank:
                self.mesh.put(buf, d, self._names["din"], (self.rank * self.depth + slot) * self._dispatch_cap,
                              nbytes=self._layout.size(n),
                              signal=(self._names["sig"], self._word(_DISPATCH_IN, self.rank, slot), seq),
                              stream=self._stream())
            send_rows.append((d, rows))
        return [rows for _, rows in sorted(send_rows, key=lambda p: p[0])]

    def _pack_dispatch(self, buf: torch.Tensor, seq: int, rows: torch.Tensor, ids: torch.Tensor,
                       weights: torch.Tensor, token_bytes: torch.Tensor, scales: torch.Tensor | None) -> None:
        n, k = int(rows.numel()), self.top_k
        o_idx, o_ids, o_w, o_tok, o_sc, _ = self._layout.offsets(n)
        self._header(buf, seq, n, _MAGIC_DISPATCH)
        if n == 0:
            return
        buf[o_idx:o_idx + 4 * n].view(torch.int32).copy_(rows)
        buf[o_ids:o_ids + 4 * n * k].view(torch.int32).view(n, k).copy_(ids.index_select(0, rows))
        buf[o_w:o_w + 4 * n * k].view(torch.float32).view(n, k).copy_(weights.index_select(0, rows))
        tb = self._layout.token_bytes
        buf[o_tok:o_tok + n * tb].view(n, tb).copy_(token_bytes.index_select(0, rows))
        if scales is not None:
            sc = self._layout.scale_cols
            buf[o_sc:o_sc + 4 * n * sc].view(torch.float32).view(n, sc).copy_(scales.index_select(0, rows))

    def _unpack_dispatch(self, buf: torch.Tensor, n: int) -> dict[str, torch.Tensor | None]:
        """Views (no copies) of a received dispatch message of n rows."""
        k, tb, sc = self.top_k, self._layout.token_bytes, self._layout.scale_cols
        o_idx, o_ids, o_w, o_tok, o_sc, _ = self._layout.offsets(n)
        return {"index": buf[o_idx:o_idx + 4 * n].view(torch.int32),
                "ids": buf[o_ids:o_ids + 4 * n * k].view(torch.int32).view(n, k),
                "weights": buf[o_w:o_w + 4 * n * k].view(torch.float32).view(n, k),
                "tokens": buf[o_tok:o_tok + n * tb].view(n, tb),
                "scales": buf[o_sc:o_sc + 4 * n * sc].view(torch.float32).view(n, sc) if sc else None}

    def _receive_dispatch(self, seq: int, slot: int, num_tokens: int,
                          send_rows: list[torch.Tensor]) -> tuple[DispatchOutput, MeshHandle]:
        msgs = []
        for s in range(self.ranks):
            if s == self.rank:
                buf = self._slot_bytes(self._dout, self._dispatch_cap, s, slot)
            else:
                self._wait(_DISPATCH_IN, s, slot, seq, f"the tokens of dispatch call {seq}")
                buf = self._slot_bytes(self._din, self._dispatch_cap, s, slot)
            n = self._read_header(buf, seq, s, _MAGIC_DISPATCH, "dispatch")
            if not 0 <= n <= self.max_tokens:
                raise MeshError(f"afdkit.dispatch: rank {s} sent {n} rows, more than max_tokens_per_rank "
                                f"{self.max_tokens}")
            msgs.append(self._unpack_dispatch(buf, n))
        out, handle = self._lay_out(msgs, seq, slot, num_tokens, send_rows)
        for s in range(self.ranks):  # after the copies (stream-ordered on CUDA)
            if s != self.rank:
                self._ack(_DISPATCH_ACK, s, slot, seq)
        return out, handle

    def _lay_out(self, msgs: list[dict], seq: int, slot: int, num_tokens: int,
                 send_rows: list[torch.Tensor]) -> tuple[DispatchOutput, MeshHandle]:
        """Copies the received rows into the slot's output buffers, expert-major, within an
        expert by (source rank, source index)."""
        dev, E_local, kmax = self.device, self.num_local_experts, self.kmax
        recv_rows = [int(m["index"].numel()) for m in msgs]
        total = sum(recv_rows)
        ids = torch.cat([m["ids"] for m in msgs]).long() if total else torch.zeros(0, self.top_k, dtype=torch.long,
                                                                                     device=dev)
        weights = torch.cat([m["weights"] for m in msgs]) if total else torch.zeros(0, self.top_k, device=dev)
        local = ids - self.rank * E_local
        local = torch.where((local >= 0) & (local < E_local), local, torch.full_like(local, E_local))
        local, perm = local.sort(dim=1, stable=True)  # a row's local experts, ascending
        local, perm = local[:, :kmax], perm[:, :kmax]
        valid = local < E_local
        pair_weight = weights.gather(1, perm)
        m_of_pair, l_of_pair = valid.nonzero(as_tuple=True)
        e_of_pair = local[m_of_pair, l_of_pair]
        order = torch.argsort(e_of_pair * max(total, 1) + m_of_pair)  # expert-major, then (source, index)
        num_rows = int(order.numel())
        row_of_pair = torch.full((total, kmax), -1, dtype=torch.long, device=dev)
        row_of_pair[m_of_pair[order], l_of_pair[order]] = torch.arange(num_rows, device=dev)
        tokens, scales, counts, offsets = self._out[slot]
        counts.copy_(torch.bincount(e_of_pair, minlength=E_local).to(torch.int32))
        offsets[0] = 0
        offsets[1:] = torch.cumsum(counts, 0)
        token_view = tokens.view(torch.uint8).view(self.capacity, self._layout.token_bytes)
        src_rank = torch.empty(num_rows, dtype=torch.long, device=dev)
        src_index = torch.empty(num_rows, dtype=torch.long, device=dev)
        start = 0
        for s, m in enumerate(msgs):
            n = recv_rows[s]
            sel = valid[start:start + n]
            m_local, l_local = sel.nonzero(as_tuple=True)
            dst = row_of_pair[start:start + n][m_local, l_local]
            if dst.numel():
                token_view.index_copy_(0, dst, m["tokens"].index_select(0, m_local))
                if scales is not None:
                    scales.index_copy_(0, dst, m["scales"].index_select(0, m_local))
                src_rank[dst] = s
                src_index[dst] = m["index"].long().index_select(0, m_local)
            start += n
        weight = torch.empty(num_rows, dtype=torch.float32, device=dev)
        weight[row_of_pair[valid]] = pair_weight[valid]
        handle = MeshHandle(seq, slot, num_tokens, send_rows, recv_rows, row_of_pair, valid, pair_weight,
                            src_rank, src_index, weight)
        return DispatchOutput(tokens, scales, counts, offsets, handle), handle

    # ---- combine ---------------------------------------------------------------------------

    def combine(self, expert_out: torch.Tensor, handle: MeshHandle | DispatchOutput, *,
                return_recv_hook: bool = False) -> torch.Tensor | Callable[[], torch.Tensor]:
        """Returns ``[T, hidden]`` bf16: per token of this rank, the weighted sum of its
        experts' rows (``expert_out`` in dispatch's row order, ``[rows, hidden]`` bf16 with
        at least the dispatch's rows). ``return_recv_hook``: as in :meth:`dispatch`."""
        op = "afdkit.dispatch.MeshDispatcher.combine"
        self._guard(op)
        h = handle.handle if isinstance(handle, DispatchOutput) else handle
        if not isinstance(h, MeshHandle) or self._open.get(h.slot) is not h:
            raise ValueError(f"{op}: 'handle' must come from this dispatcher's dispatch and not be combined yet")
        val.validate_combine(op, expert_out, self.capacity, self.hidden, self.device)
        if expert_out.shape[0] < h.num_rows:
            raise ValueError(f"{op}: 'expert_out' has {expert_out.shape[0]} rows, the dispatch produced {h.num_rows}")
        partial = self._run(self._send_combine, expert_out, h)
        done: list[torch.Tensor] = []

        def receive() -> torch.Tensor:
            if done:
                raise ValueError(f"{op}: this receive hook was already called")
            out = self._run(self._receive_combine, h, partial)
            h.combined = True
            del self._open[h.slot]
            done.append(out)
            return out

        return receive if return_recv_hook else receive()

    def _send_combine(self, expert_out: torch.Tensor, h: MeshHandle) -> torch.Tensor:
        """Reduces this rank's rows per received token (fp32, row order), sends each source
        its partials in bf16; returns the partials (this rank's own are used locally)."""
        total = sum(h.recv_rows)
        acc = torch.zeros(total, self.hidden, dtype=torch.float32, device=self.device)
        for l in range(self.kmax):
            m = h.valid[:, l].nonzero().flatten()
            if m.numel():
                rows = expert_out.index_select(0, h.row_of_pair[m, l]).float()
                acc.index_add_(0, m, rows * h.pair_weight[m, l, None])
        partial = acc.to(torch.bfloat16)
        prev = self._combined_seq[h.slot]
        start = 0
        starts = []
        for s in range(self.ranks):
            starts.append(start)
            start += h.recv_rows[s]
        for step in range(self.ranks):
            s = (self.rank + 1 + step) % self.ranks
            if s == self.rank:
                continue
            n = h.recv_rows[s]
            if prev:
                self._wait(_COMBINE_ACK, s, h.slot, prev,
                           f"the combine slot {h.slot} to be released (call {prev} read)")
            buf = self._slot_bytes(self._cout, self._combine_cap, s, h.slot)
            self._header(buf, h.seq, n, _MAGIC_COMBINE)
            if n:
                buf[_HEADER:_HEADER + 2 * n * self.hidden].view(torch.bfloat16).view(n, self.hidden).copy_(
                    partial[starts[s]:starts[s] + n])
            self.mesh.put(buf, s, self._names["cin"], (self.rank * self.depth + h.slot) * self._combine_cap,
                          nbytes=_HEADER + 2 * n * self.hidden,
                          signal=(self._names["sig"], self._word(_COMBINE_IN, self.rank, h.slot), h.seq),
                          stream=self._stream())
        me = starts[self.rank]
        return partial[me:me + h.recv_rows[self.rank]]

    def _receive_combine(self, h: MeshHandle, own_partial: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(h.num_tokens, self.hidden, dtype=torch.float32, device=self.device)
        for d in range(self.ranks):
            rows = h.send_rows[d]
            n = int(rows.numel())
            if d == self.rank:
                part = own_partial
            else:
                self._wait(_COMBINE_IN, d, h.slot, h.seq, f"the results of combine call {h.seq}")
                buf = self._slot_bytes(self._cin, self._combine_cap, d, h.slot)
                got = self._read_header(buf, h.seq, d, _MAGIC_COMBINE, "combine")
                if got != n:
                    raise MeshError(f"afdkit.dispatch: rank {d} returned {got} rows for combine call {h.seq}, "
                                    f"rank {self.rank} sent it {n}")
                part = buf[_HEADER:_HEADER + 2 * n * self.hidden].view(torch.bfloat16).view(n, self.hidden)
            if n:
                out.index_add_(0, rows, part.float())
            if d != self.rank:
                self._ack(_COMBINE_ACK, d, h.slot, h.seq)
        self._combined_seq[h.slot] = h.seq
        return out.to(torch.bfloat16)

    def pending(self) -> int:
        """Dispatches awaiting their combine (for leak checks)."""
        return len(self._open)


__all__ = ["MeshDispatcher", "MeshHandle"]
