"""FP8 MFA decode attention over a paged KV cache (Step-3's attention).

Shapes (one KV head shared by 64 query heads is the primary case):

==============  ==========================================  ==========================
``q``           ``[batch, q_len, num_q_heads, 256]``        bfloat16, q_len 1..4
``k_cache``     ``[num_pages, page_size, num_kv_heads, 256]`` float8_e4m3fn or bfloat16
``v_cache``     same as ``k_cache``
``block_table`` ``[batch, max_pages]``                      int32
``seq_lens``    ``[batch]``                                 int32, includes the q tokens
``k_scale``     ``[]``/``[1]`` (per tensor) or ``[num_pages, page_size, num_kv_heads]`` (per token), float32
``out``         like ``q``                                   bfloat16
``lse``         ``[batch, q_len, num_q_heads]``              float32, natural log
==============  ==========================================  ==========================

Query token ``i`` of ``q_len`` attends to the first ``seq_len - (q_len - 1 - i)`` cached
tokens (the new tokens are causal among themselves). CUDA tensors run the sm_90a kernel;
CPU tensors run :func:`afdkit.reference.mfa_decode_reference`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from afdkit import _validate as v

HEAD_DIM = 256
PAGE_SIZES = (16, 32, 64)
MAX_Q_LEN = 4
KV_DTYPES = (torch.float8_e4m3fn, torch.bfloat16)


@dataclass(frozen=True)
class DecodeShape:
    batch: int
    q_len: int
    num_q_heads: int
    num_kv_heads: int
    page_size: int
    num_pages: int
    max_pages: int
    kv_dtype: torch.dtype
    per_token_scale: bool


def _check_scale(op: str, name: str, scale: torch.Tensor | None, cache: torch.Tensor) -> bool:
    """Returns True for per-token scales; validates shape, dtype and device."""
    if cache.dtype == torch.bfloat16:
        if scale is not None:
            raise ValueError(f"{op}: argument '{name}' must be None for a bfloat16 cache")
        return False
    if scale is None:
        raise ValueError(f"{op}: argument '{name}' is required for a float8_e4m3fn cache")
    v.is_tensor(op, name, scale)
    v.dtype(op, name, scale, (torch.float32,))
    if scale.numel() == 1 and scale.dim() <= 1:
        return False
    if scale.shape != cache.shape[:3]:
        raise ValueError(
            f"{op}: argument '{name}' must be one value (per-tensor) or have shape "
            f"{list(cache.shape[:3])} (per-token, [num_pages, page_size, num_kv_heads]), got {list(scale.shape)}"
        )
    v.contiguous(op, name, scale)
    return True


def _check_cache(op: str, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        v.is_tensor(op, name, c)
        v.dtype(op, name, c, KV_DTYPES)
        v.ndim(op, name, c, 4, "[num_pages, page_size, num_kv_heads, head_dim]")
        v.size(op, name, c, 3, HEAD_DIM, "head_dim")
        v.contiguous(op, name, c)
    if v_cache.dtype != k_cache.dtype or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"{op}: 'k_cache' and 'v_cache' must match, got {k_cache.dtype}{list(k_cache.shape)} "
            f"and {v_cache.dtype}{list(v_cache.shape)}"
        )
    if k_cache.shape[1] not in PAGE_SIZES:
        raise ValueError(f"{op}: page_size (k_cache.shape[1]) must be one of {PAGE_SIZES}, got {k_cache.shape[1]}")


def validate_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    out: torch.Tensor | None = None,
    check_indices: bool = True,
) -> DecodeShape:
    """Checks every argument of :func:`decode`; raises TypeError/ValueError naming it."""
    op = "afdkit.mfa.decode"
    v.is_tensor(op, "q", q)
    v.dtype(op, "q", q, (torch.bfloat16,))
    v.ndim(op, "q", q, 4, "[batch, q_len, num_q_heads, head_dim]")
    v.size(op, "q", q, 3, HEAD_DIM, "head_dim")
    if q.stride(-1) != 1:
        raise ValueError(f"{op}: argument 'q' must have a contiguous last dimension, got strides {list(q.stride())}")
    batch, q_len, num_q_heads, _ = q.shape
    if not 1 <= q_len <= MAX_Q_LEN:
        raise ValueError(f"{op}: q_len (q.shape[1]) must be in 1..{MAX_Q_LEN}, got {q_len}")
    _check_cache(op, k_cache, v_cache)
    num_pages, page_size, num_kv_heads, _ = k_cache.shape
    if num_q_heads % num_kv_heads or (num_q_heads // num_kv_heads) % 16:
        raise ValueError(
            f"{op}: num_q_heads ({num_q_heads}) must be a multiple of 16 x num_kv_heads ({num_kv_heads})"
        )
    for name, t in (("block_table", block_table), ("seq_lens", seq_lens)):
        v.is_tensor(op, name, t)
        v.dtype(op, name, t, (torch.int32,))
    v.ndim(op, "block_table", block_table, 2, "[batch, max_pages]")
    v.size(op, "block_table", block_table, 0, batch, "batch")
    if block_table.stride(-1) != 1:
        raise ValueError(f"{op}: argument 'block_table' must have a contiguous last dimension")
    v.ndim(op, "seq_lens", seq_lens, 1, "[batch]")
    v.size(op, "seq_lens", seq_lens, 0, batch, "batch")
    v.contiguous(op, "seq_lens", seq_lens)
    per_token_k = _check_scale(op, "k_scale", k_scale, k_cache)
    per_token_v = _check_scale(op, "v_scale", v_scale, v_cache)
    if per_token_k != per_token_v:
        raise ValueError(f"{op}: 'k_scale' and 'v_scale' must both be per-tensor or both per-token")
    if out is not None:
        v.is_tensor(op, "out", out)
        v.dtype(op, "out", out, (torch.bfloat16,))
        if out.shape != q.shape or out.stride(-1) != 1:
            raise ValueError(f"{op}: argument 'out' must have q's shape {list(q.shape)}, got {list(out.shape)}")
    v.same_device(op, {"q": q, "k_cache": k_cache, "v_cache": v_cache, "block_table": block_table,
                       "seq_lens": seq_lens, "k_scale": k_scale, "v_scale": v_scale, "out": out})
    max_pages = block_table.shape[1]
    if check_indices and not _capturing(q):
        _check_indices(op, block_table, seq_lens, page_size, num_pages, q_len)
    return DecodeShape(batch, q_len, num_q_heads, num_kv_heads, page_size, num_pages, max_pages,
                       k_cache.dtype, per_token_k)


def _capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _check_indices(op: str, block_table: torch.Tensor, seq_lens: torch.Tensor, page_size: int,
                   num_pages: int, q_len: int) -> None:
    """Reads seq_lens and the used part of block_table (one device-to-host copy)."""
    lens = seq_lens.cpu()
    if lens.numel() and int(lens.min()) < 0:
        raise ValueError(f"{op}: seq_lens must be >= 0, got {lens.tolist()}")
    max_len = block_table.shape[1] * page_size
    over = (lens > max_len).nonzero().flatten()
    if over.numel():
        b = int(over[0])
        raise ValueError(
            f"{op}: seq_lens[{b}] = {int(lens[b])} is over the block table's capacity "
            f"({block_table.shape[1]} pages x {page_size} = {max_len} tokens)"
        )
    table = block_table.cpu()
    pages_used = (lens + page_size - 1) // page_size
    cols = torch.arange(table.shape[1])
    used = cols[None, :] < pages_used[:, None]
    bad = used & ((table < 0) | (table >= num_pages))
    if bad.any():
        b, p = (int(x) for x in bad.nonzero()[0])
        raise ValueError(
            f"{op}: block_table[{b}, {p}] = {int(table[b, p])} is out of range for a cache of {num_pages} pages"
        )


def default_softmax_scale(head_dim: int = HEAD_DIM) -> float:
    return 1.0 / math.sqrt(head_dim)


__all__ = ["validate_decode", "default_softmax_scale", "DecodeShape", "HEAD_DIM", "PAGE_SIZES"]
