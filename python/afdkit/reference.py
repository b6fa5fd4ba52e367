"""Reference implementations (the oracles): plain torch, fp32/fp64, CPU or any device.

Every kernel and the runtime are tested against these functions, so they favour
obviousness over speed, fix every convention a kernel must match bit for bit or to a
stated tolerance, and keep no global state. This module holds the kernel-level oracles:

* FP8 e4m3 quantization (``quantize_fp8``, ``dequantize_fp8``, ``quantize_fp8_with_scale``);
* the paged KV cache (``append_kv_reference``, ``gather_kv``, ``slot_mapping_for``);
* MFA decode attention (``mfa_decode_reference``) and a dense, padded counterpart
  (``dense_attention_reference``).

The Step-3 model blocks and the colocated greedy decode live in
:mod:`afdkit.reference_model` and are re-exported here (``afdkit.reference.greedy_decode``).

Conventions
-----------
FP8: ``scale = max(amax, 1e-12) / 448`` over the group in fp32 (IEEE division);
``q = e4m3(clamp(x.float() / scale, -448, 448))`` with round-to-nearest-even;
``x ~= q.float() * scale``. Scale shapes: ``"tensor"`` ``[]``, ``"token"``
``[..., 1]``, ``"channel128"`` ``[..., hidden // 128]``.

Paged cache: ``[num_pages, page_size, num_kv_heads, head_dim]``; token ``t`` of sequence
``b`` lives at page ``block_table[b, t // page_size]``, row ``t % page_size``; flat slot
``page * page_size + row``; negative slots are skipped. KV scales are either one value
(``[]`` or ``[1]``, per tensor) or ``[num_pages, page_size, num_kv_heads]`` (per token
and head, over ``head_dim``) -- told apart by shape (:func:`kv_scale_mode`).

Decode: ``seq_lens`` include the ``q_len`` new tokens; query ``i`` sees the first
``max(0, seq_len - (q_len - 1 - i))`` tokens; a row that sees nothing gives output 0 and
``lse = -inf``. ``lse[b, i, h] = log(sum_j exp(softmax_scale * q.k_j))`` (natural log),
float32, ``[batch, q_len, num_q_heads]``. GQA: query head ``h`` reads K/V head
``h // (num_q_heads // num_kv_heads)``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

E4M3_MAX = 448.0
AMAX_FLOOR = 1e-12
FP8_DTYPE = torch.float8_e4m3fn

Granularity = Literal["tensor", "token", "channel128"]
ScaleMode = Literal["tensor", "token"]

# ============================================================================ FP8


def _fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    return torch.clamp(amax, min=AMAX_FLOOR) / E4M3_MAX


def _fp8_cast(xf: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)


def _check_channel128(x: torch.Tensor) -> None:
    if x.dim() < 1 or x.shape[-1] % 128 != 0:
        raise ValueError(
            f"channel128 quantization needs x.shape[-1] % 128 == 0, got shape {list(x.shape)}"
        )


def quantize_fp8(x: torch.Tensor, granularity: Granularity = "tensor") -> tuple[torch.Tensor, torch.Tensor]:
    """Quantizes ``x`` to e4m3 with a measured scale; returns ``(q, scale)`` (scale fp32).

    ``"tensor"``: one scale (shape ``[]``). ``"token"``: one per row of the last dim
    (shape ``[..., 1]``). ``"channel128"``: one per row per 128 channels (shape
    ``[..., hidden // 128]``, DeepEP's layout); hidden must be a multiple of 128.
    An empty group set gives scale ``1e-12 / 448`` (amax taken as 0).
    """
    xf = x.float()
    if granularity == "tensor":
        amax = xf.abs().amax() if xf.numel() else torch.zeros((), dtype=torch.float32, device=x.device)
        scale = _fp8_scale(amax)
        return _fp8_cast(xf, scale), scale
    if granularity == "token":
        if x.dim() < 1:
            raise ValueError("token quantization needs at least one dimension")
        scale = _fp8_scale(xf.abs().amax(dim=-1, keepdim=True))
        return _fp8_cast(xf, scale), scale
    if granularity == "channel128":
        _check_channel128(x)
        g = xf.reshape(*xf.shape[:-1], xf.shape[-1] // 128, 128)
        scale = _fp8_scale(g.abs().amax(dim=-1, keepdim=True))
        return _fp8_cast(g, scale).reshape(x.shape), scale.squeeze(-1)
    raise ValueError(f"granularity must be 'tensor', 'token' or 'channel128', got {granularity!r}")


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, granularity: Granularity = "tensor") -> torch.Tensor:
    """``q.float() * scale`` broadcast by granularity; returns float32."""
    qf = q.float()
    s = scale.float()
    if granularity in ("tensor", "token"):
        return qf * s
    if granularity == "channel128":
        _check_channel128(q)
        g = qf.reshape(*qf.shape[:-1], qf.shape[-1] // 128, 128)
        return (g * s.unsqueeze(-1)).reshape(q.shape)
    raise ValueError(f"granularity must be 'tensor', 'token' or 'channel128', got {granularity!r}")


def quantize_fp8_with_scale(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """``e4m3(clamp(x.float() / scale, -448, 448))`` for a given (static) scale.

    ``scale`` is one value or any tensor broadcastable to ``x`` (the vLLM KV-cache
    convention: the scale is fixed ahead, values beyond ``448 * scale`` saturate).
    """
    s = scale.float() if isinstance(scale, torch.Tensor) else torch.tensor(float(scale), device=x.device)
    return _fp8_cast(x.float(), s)


# ============================================================================ paged KV cache


def kv_scale_mode(scale: torch.Tensor | None, cache: torch.Tensor) -> ScaleMode | None:
    """Classifies a KV scale by shape: ``None`` (unquantized cache), ``"tensor"`` (one
    value, shape ``[]`` or ``[1]``) or ``"token"`` (``[num_pages, page_size, num_kv_heads]``)."""
    if cache.dtype != FP8_DTYPE:
        if scale is not None:
            raise ValueError(f"a {cache.dtype} cache takes no scale")
        return None
    if scale is None:
        raise ValueError("an FP8 cache needs a scale (one value or one per token and head)")
    if scale.dim() <= 1 and scale.numel() == 1:
        return "tensor"
    if tuple(scale.shape) == tuple(cache.shape[:3]):
        return "token"
    raise ValueError(
        f"KV scale must have shape [] / [1] (per tensor) or {list(cache.shape[:3])} "
        f"([num_pages, page_size, num_kv_heads], per token), got {list(scale.shape)}"
    )


def slot_mapping_for(block_table: torch.Tensor, positions: torch.Tensor, page_size: int) -> torch.Tensor:
    """Flat cache slots of tokens at ``positions [batch, n]`` (int64, same shape).

    Negative positions map to slot -1 (skipped by :func:`append_kv_reference`).
    """
    pos = positions.long()
    safe = pos.clamp(min=0)
    pages = torch.gather(block_table.long(), 1, safe // page_size)
    slots = pages * page_size + safe % page_size
    return torch.where(pos >= 0, slots, torch.full_like(slots, -1))


def _store(cache: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> None:
    rows = cache.view(cache.shape[0] * cache.shape[1], *cache.shape[2:])
    rows[slots] = values


def _append_one(x: torch.Tensor, cache: torch.Tensor, scale: torch.Tensor | None, slots: torch.Tensor) -> None:
    mode = kv_scale_mode(scale, cache)
    if mode is None:
        _store(cache, slots, x.to(cache.dtype))
    elif mode == "tensor":
        _store(cache, slots, quantize_fp8_with_scale(x, scale.reshape(())))
    else:
        q, s = quantize_fp8(x, "token")  # per (token, head) over head_dim
        _store(cache, slots, q)
        _store(scale, slots, s.squeeze(-1))


def append_kv_reference(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Writes new K/V rows into the paged caches in place.

    ``k``, ``v``: ``[num_tokens, num_kv_heads, head_dim]`` (any float dtype).
    ``slot_mapping``: ``[num_tokens]`` flat slots (``page * page_size + row``), negative
    = skip. FP8 caches need scales: one value (``q = e4m3(clamp(x / scale))``, the scale
    is read) or cache-shaped ``[num_pages, page_size, num_kv_heads]`` float32 (per token:
    the scale of each written (token, head) is measured as in ``quantize_fp8(.., "token")``
    and written there). bf16/fp32 caches store ``x.to(cache.dtype)`` and take no scale.
    """
    if k.shape != v.shape or k.dim() != 3:
        raise ValueError(
            f"k and v must both be [num_tokens, num_kv_heads, head_dim], got {list(k.shape)}, {list(v.shape)}"
        )
    if tuple(k.shape[1:]) != tuple(k_cache.shape[2:]) or k_cache.shape != v_cache.shape:
        raise ValueError(f"k rows {list(k.shape[1:])} do not fit caches {list(k_cache.shape)} / {list(v_cache.shape)}")
    if slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"slot_mapping must be [{k.shape[0]}], got {list(slot_mapping.shape)}")
    slots = slot_mapping.long()
    keep = slots >= 0
    capacity = k_cache.shape[0] * k_cache.shape[1]
    if keep.any() and int(slots[keep].max()) >= capacity:
        raise ValueError(f"slot {int(slots[keep].max())} is beyond the cache ({capacity} slots)")
    slots = slots[keep]
    _append_one(k[keep], k_cache, k_scale, slots)
    _append_one(v[keep], v_cache, v_scale, slots)


def gather_kv(
    cache: torch.Tensor, block_table_row: torch.Tensor, seq_len: int, scale: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The first ``seq_len`` tokens of one sequence, dequantized: ``[seq_len, num_kv_heads, head_dim]``.

    Only the pages the sequence uses are read, and the unused rows of its last page
    are cut before any arithmetic, so NaN in unused cache memory never reaches the math.
    """
    page_size = cache.shape[1]
    n_pages = -(-seq_len // page_size)
    pages = block_table_row[:n_pages].long()
    rows = cache[pages].reshape(n_pages * page_size, *cache.shape[2:])[:seq_len]
    mode = kv_scale_mode(scale, cache)
    if mode is None:
        return rows.to(dtype)
    if mode == "tensor":
        return rows.to(dtype) * scale.reshape(()).to(dtype)
    s = scale[pages].reshape(n_pages * page_size, cache.shape[2])[:seq_len]
    return rows.to(dtype) * s.to(dtype).unsqueeze(-1)


# ============================================================================ attention


def visible_lengths(seq_len: int, q_len: int) -> list[int]:
    """Keys visible to each of the ``q_len`` new queries (causal among themselves)."""
    return [max(0, seq_len - (q_len - 1 - i)) for i in range(q_len)]


def _attend_one(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, q_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence: q ``[q_len, Hq, D]``, k/v ``[L, Hkv, D]`` (same dtype) ->
    (out ``[q_len, Hq, D]``, lse ``[q_len, Hq]``)."""
    hq, hkv = q.shape[1], k.shape[1]
    group = hq // hkv
    out = torch.zeros(q.shape[0], hq, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.full((q.shape[0], hq), float("-inf"), dtype=q.dtype, device=q.device)
    for i, n in enumerate(visible_lengths(k.shape[0], q_len)):
        if n == 0:
            continue
        kh = k[:n].repeat_interleave(group, dim=1)                   # [n, Hq, D]
        vh = v[:n].repeat_interleave(group, dim=1)
        logits = torch.einsum("hd,nhd->hn", q[i], kh) * scale       # [Hq, n]
        lse[i] = torch.logsumexp(logits, dim=-1)
        probs = torch.exp(logits - lse[i].unsqueeze(-1))
        out[i] = torch.einsum("hn,nhd->hd", probs, vh)
    return out, lse


def _check_decode_args(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor,
                       seq_lens: torch.Tensor) -> None:
    if q.dim() != 4:
        raise ValueError(f"q must be [batch, q_len, num_q_heads, head_dim], got {list(q.shape)}")
    if k_cache.dim() != 4 or k_cache.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"cache must be [num_pages, page_size, num_kv_heads, {q.shape[-1]}], got {list(k_cache.shape)}"
        )
    if q.shape[2] % k_cache.shape[2]:
        raise ValueError(f"num_q_heads ({q.shape[2]}) must be a multiple of num_kv_heads ({k_cache.shape[2]})")
    if block_table.shape[0] != q.shape[0] or seq_lens.shape != (q.shape[0],):
        raise ValueError("block_table and seq_lens must have one row per sequence of q")


def mfa_decode_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Decode attention over a paged (FP8 or bf16) KV cache, sequence by sequence.

    ``q [batch, q_len, num_q_heads, head_dim]``; caches ``[num_pages, page_size,
    num_kv_heads, head_dim]``; ``block_table [batch, max_pages]``; ``seq_lens [batch]``
    (including the ``q_len`` new tokens, already appended). FP8 caches are dequantized
    with their scales (see :func:`kv_scale_mode`). Math in ``dtype``; the output has
    q's dtype; ``lse`` (with ``return_lse``) is float32 ``[batch, q_len, num_q_heads]``.
    """
    _check_decode_args(q, k_cache, block_table, seq_lens)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    batch, q_len = q.shape[:2]
    out = torch.zeros(q.shape, dtype=dtype, device=q.device)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=dtype, device=q.device)
    lens = seq_lens.tolist()
    for b in range(batch):
        if lens[b] == 0:
            continue
        k = gather_kv(k_cache, block_table[b], lens[b], k_scale, dtype)
        v = gather_kv(v_cache, block_table[b], lens[b], v_scale, dtype)
        out[b], lse[b] = _attend_one(q[b].to(dtype), k, v, scale, q_len)
    out = out.to(q.dtype)
    return (out, lse.float()) if return_lse else out


def dense_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention on contiguous, padded K/V: one masked softmax over the whole batch.

    ``q [batch, q_len, Hq, D]``, ``k``/``v [batch, max_len, Hkv, D]`` (already
    dequantized), ``seq_lens [batch]`` with the same causal rule as
    :func:`mfa_decode_reference`. Positions past ``seq_len`` are ignored even if they hold
    NaN. Written as batched tensor algebra (not per sequence) so that it checks the paged
    version by a different route.
    """
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    batch, q_len, hq, _ = q.shape
    max_len, hkv = k.shape[1], k.shape[2]
    lens = seq_lens.to(device=q.device, dtype=torch.long)
    j = torch.arange(max_len, device=q.device)
    i = torch.arange(q_len, device=q.device)
    visible = (lens[:, None] - (q_len - 1 - i)[None, :]).clamp(min=0)              # [B, q_len]
    mask = j[None, None, :] < visible[:, :, None]                                    # [B, q_len, L]
    valid = (j[None, :] < lens[:, None])[:, :, None, None]                           # [B, L, 1, 1]
    kd = torch.where(valid, k.to(dtype), 0).repeat_interleave(hq // hkv, dim=2)
    vd = torch.where(valid, v.to(dtype), 0).repeat_interleave(hq // hkv, dim=2)
    logits = torch.einsum("bihd,bjhd->bhij", q.to(dtype), kd) * scale                # [B, Hq, q_len, L]
    logits = logits.masked_fill(~mask[:, None], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)                                            # -inf where empty
    probs = torch.exp(logits - torch.where(torch.isinf(lse), 0, lse).unsqueeze(-1))
    out = torch.einsum("bhij,bjhd->bihd", probs, vd).to(q.dtype)
    lse = lse.permute(0, 2, 1).float()                                               # [B, q_len, Hq]
    return (out, lse) if return_lse else out


# ============================================================================ model re-exports

_MODEL_EXPORTS = (
    "rms_norm", "rope_neox", "rope_cos_sin", "silu_and_mul", "swiglu", "dense_ffn",
    "router_topk", "routed_experts_reference", "moe_router", "moe_ffn",
    "PagedKVCache", "allocate_kv_caches", "mfa_project_qkv", "new_positions", "step3_attention_block",
    "FFNWire", "ffn_wire_in", "ffn_wire_out", "step3_layer", "decode_step", "greedy_decode",
)


def __getattr__(name: str) -> Any:
    # The model blocks import this module, so they are loaded on first use, not here.
    if name in _MODEL_EXPORTS:
        from afdkit import reference_model

        return getattr(reference_model, name)
    raise AttributeError(f"module 'afdkit.reference' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODEL_EXPORTS))


__all__ = [
    "E4M3_MAX", "AMAX_FLOOR", "FP8_DTYPE", "Granularity", "ScaleMode",
    "quantize_fp8", "dequantize_fp8", "quantize_fp8_with_scale",
    "kv_scale_mode", "slot_mapping_for", "append_kv_reference", "gather_kv",
    "visible_lengths", "mfa_decode_reference", "dense_attention_reference",
    *_MODEL_EXPORTS,
]
