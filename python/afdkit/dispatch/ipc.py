"""Expert-parallel dispatch/combine between the GPUs of one host over CUDA IPC (NVLink).

:class:`IpcDispatcher` follows the contract of :mod:`afdkit.dispatch.types` (the same as
:class:`afdkit.dispatch.mesh_backend.MeshDispatcher`); ``reference_dispatch`` and
``reference_combine`` of :mod:`afdkit.dispatch.reference` compute the same values, FP8
codes and scales and the combined bf16 rows bit for bit.

Every rank allocates one buffer (``cudaMalloc``) of the layout :func:`ipc_layout`
computes, exports its CUDA IPC handle, gets every other rank's through
``torch.distributed.all_gather_object`` on the group, and maps them. Kernels then store
straight into peers' buffers over NVLink and publish with system-scope release flags
(the protocol, and why it needs no acknowledgements, is in docs/moe.md, "CUDA IPC
backend"). Everything runs on the current CUDA stream without a host synchronization,
so a dispatch + combine can be captured in a CUDA graph and replayed.

Waits on peers are bounded (``timeout_s``): a kernel that waited too long writes an
error word in mapped host memory and returns. The host reads that word (no CUDA call)
at the start of every call and in :meth:`IpcDispatcher.check`, and raises
:class:`IpcTimeout` naming the rank waited on; the dispatcher then refuses further calls.
"""

from __future__ import annotations

import os
import socket
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from afdkit.dispatch import validate as val
from afdkit.dispatch.types import DispatchOutput

MAX_RANKS = 32  # destination sets are 32-bit masks in the kernels (csrc/moe/dispatch_ipc.h)
_ALIGN = 16  # rows and their sections: 16-byte vector stores
_FLAG_ALIGN = 128  # flags and areas start on their own cache lines
_SLOT_ALIGN = 256


class IpcError(RuntimeError):
    """A CUDA IPC dispatcher failed (bad data seen by a kernel, or a failure earlier)."""


class IpcTimeout(IpcError, TimeoutError):
    """A kernel waited longer than ``timeout_s`` for a peer's flag."""


def _align(n: int, a: int = _ALIGN) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class IpcLayout:
    """Byte offsets of one rank's buffer (the same on every rank).

    The buffer holds ``depth`` slots of ``slot_bytes``. A slot::

        dispatch_flags_offset  uint64 [ranks]: source s stores T_s + 1 (0: nothing yet)
        combine_flags_offset   uint64 [ranks]: expert rank d stores 1 (0: nothing yet)
        recv_offset            dispatch rows [ranks (source)][max_tokens], row_bytes each:
                                 token_bytes of fp8 codes (hidden) or bf16 (2 * hidden)
                                 | fp32 scales [hidden / 128] at scale_offset (fp8 only)
                                 | top-k ids int32 [k], weights fp32 [k] at meta_offset
        combine_offset         bf16 partial rows [ranks (expert rank)][max_tokens],
                               combine_row_bytes each

    Every row and section starts 16-byte aligned; flags and areas on 128-byte lines.
    """

    ranks: int
    max_tokens: int
    hidden: int
    top_k: int
    quant: str
    depth: int
    token_bytes: int
    scale_offset: int
    meta_offset: int
    row_bytes: int
    combine_row_bytes: int
    dispatch_flags_offset: int
    combine_flags_offset: int
    recv_offset: int
    combine_offset: int
    slot_bytes: int
    total_bytes: int

    def slot_offset(self, slot: int) -> int:
        """Where slot ``slot`` starts in the buffer."""
        if not 0 <= slot < self.depth:
            raise ValueError(f"slot must be in [0, {self.depth}), got {slot}")
        return slot * self.slot_bytes

    def recv_row_offset(self, slot: int, src: int, token: int) -> int:
        """Buffer offset of the dispatch row of token ``token`` of source rank ``src``."""
        return self.slot_offset(slot) + self.recv_offset + (src * self.max_tokens + token) * self.row_bytes

    def combine_row_offset(self, slot: int, rank: int, token: int) -> int:
        """Buffer offset of expert rank ``rank``'s partial row of (the owner's) token ``token``."""
        return self.slot_offset(slot) + self.combine_offset + (rank * self.max_tokens + token) * self.combine_row_bytes

    def native(self) -> dict[str, int]:
        """The offsets the kernels take (csrc/moe/dispatch_ipc.h ``Layout``)."""
        return {k: v for k, v in asdict(self).items() if isinstance(v, int)}


def ipc_layout(ranks: int, max_tokens: int, hidden: int, top_k: int, quant: str = "fp8",
               depth: int = 1) -> IpcLayout:
    """The layout of one rank's buffer: the only place its offsets are computed.

    For 4 ranks x 128 tokens x hidden 7168, FP8, top-3: rows of 7424 bytes (7168 codes,
    224 of scales, 32 of meta), partials of 14336 bytes: about 11 MB a slot.
    """
    op = "afdkit.dispatch.ipc_layout"
    for name, value in (("ranks", ranks), ("max_tokens", max_tokens), ("hidden", hidden), ("top_k", top_k),
                        ("depth", depth)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{op}: '{name}' must be an int >= 1, got {value!r}")
    if quant not in val.QUANTS:
        raise ValueError(f"{op}: quant must be one of {val.QUANTS}, got {quant!r}")
    fp8 = quant == "fp8"
    if fp8 and hidden % val.FP8_GROUP:
        raise ValueError(f"{op}: FP8 needs hidden % {val.FP8_GROUP} == 0, got {hidden}")
    token_bytes = _align(hidden if fp8 else 2 * hidden)
    scale_offset = token_bytes
    meta_offset = scale_offset + (_align(4 * (hidden // val.FP8_GROUP)) if fp8 else 0)
    row_bytes = _align(meta_offset + 8 * top_k)
    combine_row_bytes = _align(2 * hidden)
    flags = _align(8 * ranks, _FLAG_ALIGN)
    dispatch_flags_offset, combine_flags_offset = 0, flags
    recv_offset = 2 * flags
    combine_offset = _align(recv_offset + ranks * max_tokens * row_bytes, _FLAG_ALIGN)
    slot_bytes = _align(combine_offset + ranks * max_tokens * combine_row_bytes, _SLOT_ALIGN)
    return IpcLayout(ranks, max_tokens, hidden, top_k, quant, depth, token_bytes, scale_offset, meta_offset,
                     row_bytes, combine_row_bytes, dispatch_flags_offset, combine_flags_offset, recv_offset,
                     combine_offset, slot_bytes, depth * slot_bytes)


def recv_shared_bytes(ranks: int, max_tokens: int, local_experts: int) -> int:
    """Shared memory of the receive kernel: a bitmap of received tokens per local expert
    and its prefix counts (csrc/moe/dispatch_ipc.cu, ``dispatch_recv_smem_bytes``)."""
    words = (ranks * max_tokens + 31) // 32
    return (2 * local_experts * words + local_experts + 1) * 4


# Error words written by the kernels: kind << 56 | slot << 48 | peer << 32 | value.
_DISPATCH_TIMEOUT, _COMBINE_TIMEOUT, _BAD_EXPERT, _BAD_COUNT, _SHORT_OUT = 1, 2, 3, 4, 5


def decode_error(word: int, rank: int, timeout_s: float, num_experts: int = 0) -> IpcError:
    """The exception for an error word (see csrc/moe/dispatch_ipc.h ``ErrorKind``)."""
    kind, slot, peer, value = word >> 56, (word >> 48) & 0xFF, (word >> 32) & 0xFFFF, word & 0xFFFFFFFF
    signed = value - (1 << 32) if value >= 1 << 31 else value
    where = f"afdkit.dispatch.ipc: rank {rank}"
    if kind in (_DISPATCH_TIMEOUT, _COMBINE_TIMEOUT):
        what = "dispatch" if kind == _DISPATCH_TIMEOUT else "combine"
        return IpcTimeout(f"{where} waited more than {timeout_s:g} s for rank {peer}'s {what} (buffer slot {slot}): "
                          f"rank {peer} is slow, hung or gone, or the ranks disagree on the order of "
                          "dispatch/combine calls")
    if kind == _BAD_EXPERT:
        return IpcError(f"{where}: topk_ids held expert id {signed}, outside [0, {num_experts}) (check_ids was off "
                        "or skipped while capturing a CUDA graph); the token skipped that expert")
    if kind == _BAD_COUNT:
        return IpcError(f"{where}: rank {peer} announced {value} tokens, more than max_tokens_per_rank: the ranks "
                        "were built with different arguments or the buffer was overwritten")
    if kind == _SHORT_OUT:
        return IpcError(f"{where}: 'expert_out' has fewer rows than the dispatch produced (row {value} is past its "
                        "end); pass all rows of the dispatch output")
    return IpcError(f"{where}: unknown error word {word:#x}")


@dataclass(eq=False)
class IpcHandle:
    """What combine needs from one dispatch: its buffer slot and token count. The
    per-row records live on the GPU (the slot's fixed buffers); the properties below
    copy them to the host (a synchronization: for tests and debugging)."""

    owner: Any
    slot: int
    seq: int
    num_tokens: int
    output: DispatchOutput | None = None
    received: bool = False
    combining: bool = False
    combined: bool = False
    buffers: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def num_rows(self) -> int:
        return int(self.buffers["offsets"][-1])

    @property
    def src_rank(self) -> torch.Tensor:
        """Source rank of each used row (int64)."""
        return self.buffers["row_src"][:self.num_rows].long()

    @property
    def src_index(self) -> torch.Tensor:
        """Token index on the source rank of each used row (int64)."""
        return self.buffers["row_index"][:self.num_rows].long()

    @property
    def weight(self) -> torch.Tensor:
        """Top-k weight of each used row (fp32)."""
        return self.buffers["row_weight"][:self.num_rows].clone()


def _all_gather(obj: Any, group: Any, ranks: int) -> list[Any]:
    out: list[Any] = [None] * ranks
    torch.distributed.all_gather_object(out, obj, group=group)
    return out


class IpcDispatcher:
    """Dispatch/combine among the ranks of a ``torch.distributed`` group whose GPUs share
    a host (NVLink). Collective to construct (it exchanges CUDA IPC handles over the
    group), as are :meth:`dispatch`, :meth:`combine` and :meth:`close`: every rank makes
    the same calls in the same order. Each rank works on its current CUDA device.

    Options: ``depth`` (default 2) buffer slots, so up to ``depth`` dispatches may await
    their combine; ``timeout_s`` (default 10) bounds every wait on a peer inside the
    kernels; ``check_ids`` (default True) reads the ids on the host to validate them
    (skipped while capturing a CUDA graph).

    ``dispatch`` returns a :class:`DispatchOutput` whose tensors are the slot's fixed
    buffers: valid until the slot is reused (after its combine, at the next dispatch
    that takes the slot).
    """

    def __init__(self, group: Any, num_experts: int, max_tokens_per_rank: int, hidden: int, top_k: int,
                 quant: str = "fp8", *, depth: int = 2, timeout_s: float = 10.0, check_ids: bool = True) -> None:
        op = "afdkit.dispatch.IpcDispatcher"
        dist = torch.distributed
        if not torch.cuda.is_available():
            raise ValueError(f"{op}: the CUDA IPC backend needs CUDA GPUs; on CPU use an afdkit.mesh.Mesh")
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError(f"{op}: initialize torch.distributed first (one process per GPU of this host)")
        group = group if group is not None else dist.group.WORLD
        ranks = dist.get_world_size(group)
        val.validate_config(op, num_experts, ranks, max_tokens_per_rank, hidden, top_k, quant)
        if ranks > MAX_RANKS:
            raise ValueError(f"{op}: at most {MAX_RANKS} ranks, got {ranks}")
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"{op}: depth must be an int >= 1, got {depth!r}")
        if not timeout_s > 0:
            raise ValueError(f"{op}: timeout_s must be > 0, got {timeout_s!r}")
        self.group, self.rank, self.ranks = group, dist.get_rank(group), ranks
        self.num_experts, self.max_tokens, self.hidden, self.top_k = num_experts, max_tokens_per_rank, hidden, top_k
        self.quant, self.depth, self.timeout_s, self.check_ids = quant, depth, float(timeout_s), check_ids
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.num_local_experts = num_experts // ranks
        self.kmax = min(top_k, self.num_local_experts)
        self.capacity = val.receive_capacity(ranks, max_tokens_per_rank, top_k, self.num_local_experts)
        self.layout = ipc_layout(ranks, max_tokens_per_rank, hidden, top_k, quant, depth)
        self._check_shared_memory(op)
        self._open: dict[int, IpcHandle] = {}
        self._seq = 0
        self._failed: BaseException | None = None
        self._closed = False
        self._connect(op)

    def _check_shared_memory(self, op: str) -> None:
        need = recv_shared_bytes(self.ranks, self.max_tokens, self.num_local_experts)
        props = torch.cuda.get_device_properties(self.device)
        limit = getattr(props, "shared_memory_per_block_optin", 227 * 1024) - 1024
        if need > limit:
            raise ValueError(f"{op}: {self.num_local_experts} local experts x {self.ranks} ranks x "
                             f"{self.max_tokens} tokens need {need} bytes of shared memory in the receive kernel, "
                             f"more than the device's {limit}; lower max_tokens_per_rank")

    def _connect(self, op: str) -> None:
        """Allocates this rank's buffer, exchanges handles, maps the peers' buffers."""
        from afdkit._dlpack import capsule
        from afdkit._native import native

        lib = native().dispatch_ipc
        self._buffer = lib.IpcBuffer(self.layout.total_bytes, self.device.index)
        mine = {"host": socket.gethostname(), "pid": os.getpid(), "handle": self._buffer.handle(),
                "layout": self.layout}
        infos = _all_gather(mine, self.group, self.ranks)
        for r, info in enumerate(infos):
            if info["host"] != mine["host"]:
                raise ValueError(f"{op}: rank {r} runs on host {info['host']!r}, rank {self.rank} on "
                                 f"{mine['host']!r}: CUDA IPC needs the GPUs of one host (use an afdkit.mesh.Mesh "
                                 "across hosts)")
            if info["layout"] != self.layout:
                raise ValueError(f"{op}: rank {r} was built with other arguments ({info['layout']}) than rank "
                                 f"{self.rank} ({self.layout})")
        bases = [self._buffer.base if r == self.rank else self._buffer.open_peer(r, info["handle"])
                 for r, info in enumerate(infos)]
        self._peers = torch.tensor(bases, dtype=torch.int64, device=self.device)
        self._slots = [self._slot_buffers() for _ in range(self.depth)]
        config = {"rank": self.rank, "ranks": self.ranks, "max_tokens": self.max_tokens, "hidden": self.hidden,
                  "top_k": self.top_k, "num_experts": self.num_experts, "local_experts": self.num_local_experts,
                  "kmax": self.kmax, "fp8": int(self.quant == "fp8"), "timeout_ns": int(self.timeout_s * 1e9)}
        slots = [{k: capsule(v) for k, v in s.items() if v is not None} for s in self._slots]
        self._plan = lib.Plan(config, self.layout.native(), self._buffer.base, capsule(self._peers),
                              self._buffer.error_word, slots)
        torch.cuda.synchronize(self.device)  # the zeroed slot buffers before any kernel reads them
        _all_gather(self.rank, self.group, self.ranks)  # every rank mapped every buffer

    def _slot_buffers(self) -> dict[str, torch.Tensor | None]:
        dev, cap, h = self.device, self.capacity, self.hidden
        fp8 = self.quant == "fp8"
        z = lambda n, dtype=torch.int32: torch.zeros(n, dtype=dtype, device=dev)  # noqa: E731
        return {
            "tokens": torch.zeros(cap, h, dtype=torch.float8_e4m3fn if fp8 else torch.bfloat16, device=dev),
            "scales": torch.zeros(cap, h // val.FP8_GROUP, dtype=torch.float32, device=dev) if fp8 else None,
            "counts": z(self.num_local_experts), "offsets": z(self.num_local_experts + 1),
            "recv_tokens": z(self.ranks), "row_of_pair": z(self.ranks * self.max_tokens * self.kmax),
            "row_src": z(cap), "row_index": z(cap), "row_weight": z(cap, torch.float32),
            "dest_mask": z(self.max_tokens), "counters": z(2),
        }

    # ---- state -------------------------------------------------------------------------------

    def _stream(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream

    def _guard(self, op: str) -> None:
        if self._closed:
            raise IpcError(f"{op}: this dispatcher is closed")
        if self._failed is not None:
            raise IpcError(f"{op}: this dispatcher failed earlier ({type(self._failed).__name__}: {self._failed}); "
                           "create a new one on every rank")
        word = self._buffer.error()
        if word:
            self._failed = decode_error(word, self.rank, self.timeout_s, self.num_experts)
            raise self._failed

    def check(self, synchronize: bool = True) -> None:
        """Raises the error a kernel reported (:class:`IpcTimeout` for a wait past
        ``timeout_s``), after waiting for the current stream when ``synchronize``."""
        if synchronize and not self._closed:
            torch.cuda.current_stream(self.device).synchronize()
        self._guard("afdkit.dispatch.IpcDispatcher.check")

    def pending(self) -> int:
        """Dispatches awaiting their combine (for leak checks)."""
        return len(self._open)

    @property
    def buffers(self) -> list[dict[str, torch.Tensor | None]]:
        """The fixed output buffers of each slot (tests poison them before a call)."""
        return self._slots

    # ---- dispatch ----------------------------------------------------------------------------

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, *,
                 check_ids: bool | None = None,
                 return_recv_hook: bool = False) -> DispatchOutput | Callable[[], DispatchOutput]:
        """Sends each token (quantized once when FP8) to every rank owning one of its
        experts and returns this rank's rows expert-major. ``return_recv_hook=True``
        returns after launching the send; calling the hook (once) launches the receive
        and returns the :class:`DispatchOutput`. No host synchronization either way."""
        op = "afdkit.dispatch.IpcDispatcher.dispatch"
        self._guard(op)
        slot = val.validate_dispatch_call(op, self, x, topk_ids, topk_weights, check_ids, self._open)
        from afdkit._dlpack import capsule

        if not x.is_contiguous():
            x = x.contiguous()
        elif x.numel() and x.data_ptr() % _ALIGN:
            x = x.clone()
        self._plan.dispatch_send(slot, capsule(x), capsule(topk_ids.contiguous()),
                                 capsule(topk_weights.contiguous()), self._stream())
        self._seq += 1
        buffers = self._slots[slot]
        handle = IpcHandle(self, slot, self._seq, x.shape[0], buffers=buffers)
        handle.output = DispatchOutput(buffers["tokens"], buffers["scales"], buffers["counts"], buffers["offsets"],
                                       handle)
        self._open[slot] = handle

        def receive() -> DispatchOutput:
            if handle.received:
                raise ValueError(f"{op}: this receive hook was already called")
            self._guard(op)
            self._plan.dispatch_recv(slot, self._stream())
            handle.received = True
            return handle.output

        return receive if return_recv_hook else receive()

    # ---- combine -----------------------------------------------------------------------------

    def combine(self, expert_out: torch.Tensor, handle: IpcHandle | DispatchOutput, *,
                return_recv_hook: bool = False) -> torch.Tensor | Callable[[], torch.Tensor]:
        """Returns ``[T, hidden]`` bf16: per token of this rank, the weighted sum of its
        experts' rows (``expert_out`` bf16 in dispatch's row order, all of the dispatch's
        rows or the full capacity). ``return_recv_hook``: as in :meth:`dispatch`.
        Rows short of the dispatch's are reported by the kernel (see :meth:`check`): the
        host does not know the row count without a synchronization."""
        op = "afdkit.dispatch.IpcDispatcher.combine"
        self._guard(op)
        h = handle.handle if isinstance(handle, DispatchOutput) else handle
        if not isinstance(h, IpcHandle) or h.owner is not self or self._open.get(h.slot) is not h or h.combining:
            raise ValueError(f"{op}: 'handle' must come from this dispatcher's dispatch and not be combined yet")
        if not h.received:
            raise ValueError(f"{op}: call the dispatch's receive hook before combining its output")
        val.validate_combine(op, expert_out, self.capacity, self.hidden, self.device)
        from afdkit._dlpack import capsule

        y = expert_out if expert_out.stride(-1) == 1 else expert_out.contiguous()
        self._plan.combine_send(h.slot, capsule(y), self._stream())
        h.combining = True
        out = torch.empty(h.num_tokens, self.hidden, dtype=torch.bfloat16, device=self.device)

        def receive() -> torch.Tensor:
            if h.combined:
                raise ValueError(f"{op}: this receive hook was already called")
            self._guard(op)
            self._plan.combine_recv(h.slot, capsule(out), self._stream())
            h.combined = True
            del self._open[h.slot]
            return out

        return receive if return_recv_hook else receive()

    # ---- teardown ----------------------------------------------------------------------------

    def close(self) -> None:
        """Collective: waits for this rank's work, meets the other ranks, unmaps their
        buffers, meets them again (nobody still maps ours), frees this rank's buffer."""
        if self._closed:
            return
        torch.cuda.synchronize(self.device)
        _all_gather(self.rank, self.group, self.ranks)  # every rank's kernels are done
        self._plan = None
        self._buffer.close_peers()
        _all_gather(self.rank, self.group, self.ranks)  # nobody maps our buffer any more
        self._buffer.close()
        self._closed = True
        self._open.clear()

    def __enter__(self) -> IpcDispatcher:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["IpcDispatcher", "IpcHandle", "IpcLayout", "IpcError", "IpcTimeout", "ipc_layout", "decode_error",
           "recv_shared_bytes", "MAX_RANKS"]
