"""MoE on the FFN side, one device: router top-k, expert-major permute and its inverse.

``route(router_logits, top_k)`` -> ``(weights fp32 [T, k], ids int32 [T, k])`` by descending
score (softmax or sigmoid scoring, optional renormalisation; Step-3: softmax, top-3, not
renormalised). ``permute(x, topk_ids, num_experts)`` -> :class:`Permuted`: rows grouped by
expert (FP8 e4m3 with per-128-channel scales, or x's dtype), per-expert counts and
offsets, and the inverse map. ``unpermute(y, permuted, topk_weights)`` -> bf16 ``[T, hidden]``
with ``out[t] = sum_k w[t, k] * y[row of (t, k)]``.

CUDA tensors run the native kernels on the current stream (no host sync, graph-capturable);
CPU tensors run the same math in torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from afdkit import _validate as v
from afdkit._dlpack import capsule, stream_of
from afdkit._native import native


def _check_route(logits: torch.Tensor, top_k: int, scoring: str) -> None:
    op = "afdkit.moe.route"
    v.is_tensor(op, "router_logits", logits)
    v.dtype(op, "router_logits", logits, (torch.float32, torch.bfloat16, torch.float16))
    v.ndim(op, "router_logits", logits, 2, "[tokens, num_experts]")
    if not 1 <= top_k <= min(logits.shape[1], 16):
        raise ValueError(f"{op}: top_k must be in 1..min(num_experts, 16) = {min(logits.shape[1], 16)}, got {top_k}")
    if logits.shape[1] > 512:
        raise ValueError(f"{op}: at most 512 experts are supported, got {logits.shape[1]}")
    if scoring not in ("softmax", "sigmoid"):
        raise ValueError(f"{op}: scoring must be 'softmax' or 'sigmoid', got {scoring!r}")


@torch.library.custom_op("afdkit::moe_route", mutates_args=())
def _route(logits: torch.Tensor, top_k: int, scoring: str, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if logits.device.type != "cuda":
        from afdkit import reference

        w, ids = reference.router_topk(logits, top_k, scoring=scoring, renormalize=renormalize)
        return w.float(), ids.to(torch.int32)
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    w = torch.empty(logits.shape[0], top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(logits.shape[0], top_k, dtype=torch.int32, device=logits.device)
    native().moe.route(capsule(logits), capsule(w), capsule(ids), top_k, scoring, renormalize, stream_of(logits))
    return w, ids


@_route.register_fake
def _(logits, top_k, scoring, renormalize):
    shape = (logits.shape[0], top_k)
    return (torch.empty(shape, dtype=torch.float32, device=logits.device),
            torch.empty(shape, dtype=torch.int32, device=logits.device))


def route(router_logits: torch.Tensor, top_k: int, scoring: str = "softmax",
          renormalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores experts and picks the top-k per token; returns (weights fp32, ids int32)."""
    _check_route(router_logits, top_k, scoring)
    return _route(router_logits, top_k, scoring, renormalize)


@dataclass
class Permuted:
    """Expert-major tokens and what unpermute needs to undo the permutation."""

    x: torch.Tensor                # [T * k, hidden], rows grouped by expert
    scales: torch.Tensor | None    # [T * k, hidden / 128] fp32 when FP8
    expert_counts: torch.Tensor    # [E] int32
    expert_offsets: torch.Tensor   # [E + 1] int32; grouped GEMM offsets = expert_offsets[1:]
    inverse: torch.Tensor          # [T, k] int32: row of (token, k) in x


def _check_permute(x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, quant: str, check_ids: bool) -> None:
    op = "afdkit.moe.permute"
    v.is_tensor(op, "x", x)
    v.dtype(op, "x", x, (torch.bfloat16, torch.float16, torch.float32))
    v.ndim(op, "x", x, 2, "[tokens, hidden]")
    v.is_tensor(op, "topk_ids", topk_ids)
    v.dtype(op, "topk_ids", topk_ids, (torch.int32, torch.int64))
    v.ndim(op, "topk_ids", topk_ids, 2, "[tokens, top_k]")
    v.size(op, "topk_ids", topk_ids, 0, x.shape[0], "tokens")
    if quant not in ("fp8", "none"):
        raise ValueError(f"{op}: quant must be 'fp8' or 'none', got {quant!r}")
    if quant == "fp8" and x.shape[1] % 128:
        raise ValueError(f"{op}: FP8 needs hidden % 128 == 0 (one scale per 128 channels), got hidden {x.shape[1]}")
    if not 1 <= num_experts <= 512:
        raise ValueError(f"{op}: num_experts must be in 1..512, got {num_experts}")
    v.same_device(op, {"x": x, "topk_ids": topk_ids})
    if check_ids and not (x.is_cuda and torch.cuda.is_current_stream_capturing()) and topk_ids.numel():
        lo, hi = int(topk_ids.min()), int(topk_ids.max())
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"{op}: expert ids must be in [0, {num_experts}), got values in [{lo}, {hi}]")


def _permute_cpu(x: torch.Tensor, ids: torch.Tensor, num_experts: int, quant: str) -> Permuted:
    tokens, top_k = ids.shape
    flat = ids.reshape(-1).long()
    order = torch.sort(flat, stable=True).indices          # rows by expert, then by (token, k)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    counts = torch.bincount(flat, minlength=num_experts).to(torch.int32)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int32)
    offsets[1:] = torch.cumsum(counts, 0)
    rows = x[order // top_k]
    scales = None
    if quant == "fp8":
        from afdkit import reference

        rows, scales = reference.quantize_fp8(rows, "channel128")
    return Permuted(rows, scales, counts, offsets, inverse.view(tokens, top_k).to(torch.int32))


def permute(x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, quant: str = "fp8",
            check_ids: bool = True) -> Permuted:
    """Groups each token's copies by expert (FP8 + per-128-channel scales by default).

    ``check_ids`` reads the ids' range on the host (one device-to-host copy; skipped during
    graph capture); pass False for ids that :func:`route` produced, as decode loops do.
    """
    _check_permute(x, topk_ids, num_experts, quant, check_ids)
    if x.device.type != "cuda":
        return _permute_cpu(x, topk_ids, num_experts, quant)
    ids = topk_ids.to(torch.int32).contiguous()
    tokens, top_k = ids.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    dev = x.device
    out = torch.empty(tokens * top_k, x.shape[1], device=dev,
                      dtype=torch.float8_e4m3fn if quant == "fp8" else x.dtype)
    scales = torch.empty(tokens * top_k, x.shape[1] // 128, device=dev) if quant == "fp8" else None
    counts = torch.empty(num_experts, dtype=torch.int32, device=dev)
    offsets = torch.empty(num_experts + 1, dtype=torch.int32, device=dev)
    inverse = torch.empty(tokens, top_k, dtype=torch.int32, device=dev)
    cursor = torch.empty(num_experts, dtype=torch.int32, device=dev)
    native().moe.permute(capsule(x), capsule(ids), num_experts, capsule(out),
                         None if scales is None else capsule(scales), capsule(counts), capsule(offsets),
                         capsule(inverse), capsule(cursor), stream_of(x))
    return Permuted(out, scales, counts, offsets, inverse)


def unpermute(y: torch.Tensor, permuted: Permuted, topk_weights: torch.Tensor) -> torch.Tensor:
    """``out[t] = sum_k topk_weights[t, k] * y[permuted.inverse[t, k]]`` (fp32 sums, bf16 out)."""
    op = "afdkit.moe.unpermute"
    inverse = permuted.inverse
    tokens, top_k = inverse.shape
    v.is_tensor(op, "y", y)
    v.ndim(op, "y", y, 2, "[tokens * top_k, hidden]")
    v.size(op, "y", y, 0, tokens * top_k, "tokens * top_k")
    v.is_tensor(op, "topk_weights", topk_weights)
    if topk_weights.shape != inverse.shape:
        raise ValueError(f"{op}: 'topk_weights' must have shape {list(inverse.shape)}, got {list(topk_weights.shape)}")
    v.same_device(op, {"y": y, "inverse": inverse, "topk_weights": topk_weights})
    if y.device.type != "cuda":
        gathered = y.float()[inverse.long()]                     # [T, k, hidden]
        return (gathered * topk_weights.float()[..., None]).sum(1).to(torch.bfloat16)
    v.dtype(op, "y", y, (torch.bfloat16,))
    out = torch.empty(tokens, y.shape[1], dtype=torch.bfloat16, device=y.device)
    native().moe.unpermute(capsule(y if y.stride(-1) == 1 else y.contiguous()), capsule(inverse),
                           capsule(topk_weights.float().contiguous()), capsule(out), stream_of(y))
    return out


__all__ = ["route", "permute", "unpermute", "Permuted"]
