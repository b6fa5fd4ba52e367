"""Argument checks shared by every dispatcher backend (mesh, CUDA IPC).

Each check raises before anything is sent, with a message naming the op, the argument,
the limit and the value given: ``TypeError`` for a wrong type or dtype, ``ValueError``
for a wrong shape, size, device or value. Backends call :func:`validate_dispatch` at the
top of ``dispatch`` and :func:`validate_combine` at the top of ``combine``.
"""

from __future__ import annotations

from typing import Any

import torch

from afdkit import _validate as v

QUANTS = ("fp8", "none")
FP8_GROUP = 128  # channels per fp32 scale (the convention of reference.quantize_fp8 "channel128")
MAX_TOP_K = 16


def _capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def validate_config(op: str, num_experts: int, ranks: int, max_tokens: int, hidden: int, top_k: int,
                    quant: str) -> None:
    """Checks a dispatcher's construction arguments (every rank passes the same ones)."""
    for name, value in (("num_experts", num_experts), ("ranks", ranks), ("max_tokens_per_rank", max_tokens),
                        ("hidden", hidden), ("top_k", top_k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{op}: '{name}' must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{op}: '{name}' must be >= 1, got {value}")
    if quant not in QUANTS:
        raise ValueError(f"{op}: quant must be one of {QUANTS}, got {quant!r}")
    if quant == "fp8" and hidden % FP8_GROUP:
        raise ValueError(f"{op}: FP8 needs hidden % {FP8_GROUP} == 0 (one fp32 scale per {FP8_GROUP} channels), "
                         f"got hidden {hidden}")
    if num_experts % ranks:
        raise ValueError(f"{op}: num_experts ({num_experts}) must be a multiple of the number of ranks ({ranks}): "
                         "every rank owns num_experts / ranks experts")
    if not 1 <= top_k <= min(num_experts, MAX_TOP_K):
        raise ValueError(f"{op}: top_k must be in 1..min(num_experts, {MAX_TOP_K}) = "
                         f"{min(num_experts, MAX_TOP_K)}, got {top_k}")


def receive_capacity(ranks: int, max_tokens: int, top_k: int, experts_per_rank: int) -> int:
    """Rows of a rank's receive buffer: every token of every rank can bring at most
    ``min(top_k, experts_per_rank)`` rows (one per distinct local expert it chose)."""
    return ranks * max_tokens * min(top_k, experts_per_rank)


def validate_dispatch(op: str, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                      num_experts: int, max_tokens: int, hidden: int, quant: str, check_ids: bool) -> None:
    """Checks the arguments of ``dispatch(x, topk_ids, topk_weights)``.

    ``x``: bf16 ``[T, hidden]`` with ``T <= max_tokens``; ``topk_ids``: int32/int64
    ``[T, k]`` with ``1 <= k <= min(num_experts, 16)``; ``topk_weights``: fp32 ``[T, k]``;
    all on one device. With ``check_ids`` (and not while a CUDA graph is being captured)
    the ids are read on the host: each must be in ``[0, num_experts)`` and distinct
    within its token (a duplicate would need two rows of one expert for one token).
    """
    v.is_tensor(op, "x", x)
    v.dtype(op, "x", x, (torch.bfloat16,))
    v.ndim(op, "x", x, 2, "[tokens, hidden]")
    v.size(op, "x", x, 1, hidden, "hidden")
    v.is_tensor(op, "topk_ids", topk_ids)
    v.dtype(op, "topk_ids", topk_ids, (torch.int32, torch.int64))
    v.ndim(op, "topk_ids", topk_ids, 2, "[tokens, top_k]")
    v.size(op, "topk_ids", topk_ids, 0, x.shape[0], "tokens of x")
    v.is_tensor(op, "topk_weights", topk_weights)
    v.dtype(op, "topk_weights", topk_weights, (torch.float32,))
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(f"{op}: 'topk_weights' must have the shape of 'topk_ids' {list(topk_ids.shape)}, "
                         f"got {list(topk_weights.shape)}")
    v.same_device(op, {"x": x, "topk_ids": topk_ids, "topk_weights": topk_weights})
    tokens, top_k = topk_ids.shape
    if tokens > max_tokens:
        raise ValueError(f"{op}: {tokens} tokens exceed max_tokens_per_rank = {max_tokens} (the receive buffers "
                         "are sized for it)")
    if not 1 <= top_k <= min(num_experts, MAX_TOP_K):
        raise ValueError(f"{op}: top_k (dimension 1 of 'topk_ids') must be in 1..min(num_experts, {MAX_TOP_K}) = "
                         f"{min(num_experts, MAX_TOP_K)}, got {top_k}")
    if quant not in QUANTS:
        raise ValueError(f"{op}: quant must be one of {QUANTS}, got {quant!r}")
    if quant == "fp8" and hidden % FP8_GROUP:
        raise ValueError(f"{op}: FP8 needs hidden % {FP8_GROUP} == 0 (one fp32 scale per {FP8_GROUP} channels), "
                         f"got hidden {hidden}")
    if check_ids and tokens and not _capturing(topk_ids):
        check_expert_ids(op, topk_ids, num_experts)


def check_expert_ids(op: str, topk_ids: torch.Tensor, num_experts: int) -> None:
    """Host check of the ids' values (one device-to-host copy on CUDA)."""
    ids = topk_ids.detach().to("cpu", torch.int64)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= num_experts:
        bad = ((ids < 0) | (ids >= num_experts)).nonzero()[0].tolist()
        raise ValueError(f"{op}: expert ids must be in [0, {num_experts}), got values in [{lo}, {hi}] "
                         f"(first bad one: topk_ids[{bad[0]}, {bad[1]}] = {int(ids[bad[0], bad[1]])})")
    if ids.shape[1] > 1:
        s = ids.sort(dim=1).values
        dup = (s[:, 1:] == s[:, :-1]).any(dim=1).nonzero()
        if dup.numel():
            t = int(dup[0])
            raise ValueError(f"{op}: the top-k ids of a token must be distinct; token {t} has {ids[t].tolist()}")


def validate_device(op: str, x: torch.Tensor, device: torch.device) -> None:
    """The inputs must live where the dispatcher's buffers live."""
    if x.device != device:
        raise ValueError(f"{op}: this dispatcher works on {device}, but 'x' is on {x.device}")


def validate_top_k(op: str, topk_ids: torch.Tensor, top_k: int) -> None:
    """The ids' width must be the top-k the dispatcher was built for (it sizes the buffers)."""
    if isinstance(topk_ids, torch.Tensor) and topk_ids.dim() == 2 and topk_ids.shape[1] != top_k:
        raise ValueError(f"{op}: this dispatcher was built for top_k = {top_k}, but 'topk_ids' has "
                         f"{topk_ids.shape[1]} columns")


def validate_dispatch_call(op: str, disp: Any, x: torch.Tensor, topk_ids: torch.Tensor,
                           topk_weights: torch.Tensor, check_ids: bool | None, open_slots: Any) -> int:
    """Everything a backend's ``dispatch`` checks before it moves anything (shapes, dtypes,
    device, ids, a free slot); returns the lowest slot no open dispatch holds. ``disp`` has
    the dispatcher attributes both backends share (top_k, device, num_experts, max_tokens,
    hidden, quant, check_ids, depth)."""
    validate_top_k(op, topk_ids, disp.top_k)
    if isinstance(x, torch.Tensor):
        validate_device(op, x, disp.device)
    validate_dispatch(op, x, topk_ids, topk_weights, disp.num_experts, disp.max_tokens, disp.hidden, disp.quant,
                      disp.check_ids if check_ids is None else check_ids)
    free = [s for s in range(disp.depth) if s not in open_slots]
    if not free:
        raise ValueError(f"{op}: {disp.depth} dispatches already await their combine (depth = {disp.depth}); "
                         "combine one first")
    return free[0]


def validate_combine(op: str, expert_out: torch.Tensor, capacity: int, hidden: int, device: torch.device) -> None:
    """``expert_out``: bf16 ``[rows, hidden]`` in dispatch's row order, ``rows <= capacity``
    (the rows of the dispatch output, or all of its fixed ``capacity``)."""
    v.is_tensor(op, "expert_out", expert_out)
    v.dtype(op, "expert_out", expert_out, (torch.bfloat16,))
    v.ndim(op, "expert_out", expert_out, 2, "[rows, hidden]")
    v.size(op, "expert_out", expert_out, 1, hidden, "hidden")
    if expert_out.shape[0] > capacity:
        raise ValueError(f"{op}: 'expert_out' has {expert_out.shape[0]} rows, more than the receive capacity "
                         f"{capacity}")
    if expert_out.device != device:
        raise ValueError(f"{op}: this dispatcher works on {device}, but 'expert_out' is on {expert_out.device}")


__all__ = ["validate_dispatch", "validate_combine", "validate_config", "validate_device", "validate_top_k",
           "check_expert_ids", "receive_capacity", "QUANTS", "FP8_GROUP", "MAX_TOP_K"]
