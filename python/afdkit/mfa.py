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

from afdkit import _validate as chk

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
    chk.is_tensor(op, name, scale)
    chk.dtype(op, name, scale, (torch.float32,))
    if scale.numel() == 1 and scale.dim() <= 1:
        return False
    if scale.shape != cache.shape[:3]:
        raise ValueError(
            f"{op}: argument '{name}' must be one value (per-tensor) or have shape "
            f"{list(cache.shape[:3])} (per-token, [num_pages, page_size, num_kv_heads]), got {list(scale.shape)}"
        )
    chk.contiguous(op, name, scale)
    return True


def _check_cache(op: str, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        chk.is_tensor(op, name, c)
        chk.dtype(op, name, c, KV_DTYPES)
        chk.ndim(op, name, c, 4, "[num_pages, page_size, num_kv_heads, head_dim]")
        chk.size(op, name, c, 3, HEAD_DIM, "head_dim")
        chk.contiguous(op, name, c)
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
    chk.is_tensor(op, "q", q)
    chk.dtype(op, "q", q, (torch.bfloat16,))
    chk.ndim(op, "q", q, 4, "[batch, q_len, num_q_heads, head_dim]")
    chk.size(op, "q", q, 3, HEAD_DIM, "head_dim")
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
        chk.is_tensor(op, name, t)
        chk.dtype(op, name, t, (torch.int32,))
    chk.ndim(op, "block_table", block_table, 2, "[batch, max_pages]")
    chk.size(op, "block_table", block_table, 0, batch, "batch")
    if block_table.stride(-1) != 1:
        raise ValueError(f"{op}: argument 'block_table' must have a contiguous last dimension")
    chk.ndim(op, "seq_lens", seq_lens, 1, "[batch]")
    chk.size(op, "seq_lens", seq_lens, 0, batch, "batch")
    chk.contiguous(op, "seq_lens", seq_lens)
    per_token_k = _check_scale(op, "k_scale", k_scale, k_cache)
    per_token_v = _check_scale(op, "v_scale", v_scale, v_cache)
    if per_token_k != per_token_v:
        raise ValueError(f"{op}: 'k_scale' and 'v_scale' must both be per-tensor or both per-token")
    if out is not None:
        chk.is_tensor(op, "out", out)
        chk.dtype(op, "out", out, (torch.bfloat16,))
        if out.shape != q.shape or out.stride(-1) != 1:
            raise ValueError(f"{op}: argument 'out' must have q's shape {list(q.shape)}, got {list(out.shape)}")
    chk.same_device(op, {"q": q, "k_cache": k_cache, "v_cache": v_cache, "block_table": block_table,
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


# ----------------------------------------------------------------------------- plan
@dataclass
class DecodePlan:
    """Split-KV schedule and partial-result buffers for one (batch, q_len, heads) shape.

    Allocate once (:meth:`create`), refresh once per decode step with :meth:`update`
    (one small kernel that reads ``seq_lens`` on the GPU), and pass to every layer's
    :func:`decode` of that step: the whole step can then be captured in a CUDA graph.
    """

    batch: int
    q_len: int
    num_q_heads: int
    num_kv_heads: int
    num_sm_parts: int
    part_meta: torch.Tensor
    batch_meta: torch.Tensor
    o_partial: torch.Tensor
    lse_partial: torch.Tensor

    @classmethod
    def create(cls, q: torch.Tensor, k_cache: torch.Tensor) -> "DecodePlan":
        from afdkit._native import native

        batch, q_len, hq, _ = q.shape
        hkv = k_cache.shape[2]
        dev = q.device
        s = native().mfa.plan_sizes(batch, q_len, hq, hkv, dev.index if dev.index is not None else 0)
        i32 = dict(dtype=torch.int32, device=dev)
        return cls(batch, q_len, hq, hkv, s["num_sm_parts"],
                   torch.zeros(max(1, s["part_meta_ints"]), **i32), torch.zeros(max(1, s["batch_meta_ints"]), **i32),
                   torch.empty(max(1, s["o_partial_floats"]), dtype=torch.float32, device=dev),
                   torch.empty(max(1, s["lse_partial_floats"]), dtype=torch.float32, device=dev))

    def update(self, seq_lens: torch.Tensor) -> None:
        """Schedules the step for these ``seq_lens`` (int32 [batch] on the plan's device)."""
        if seq_lens.shape != (self.batch,) or seq_lens.dtype != torch.int32 or seq_lens.device != self.part_meta.device:
            raise ValueError(f"afdkit.mfa.DecodePlan.update: seq_lens must be int32[{self.batch}] on "
                             f"{self.part_meta.device}, got {seq_lens.dtype}{list(seq_lens.shape)} on {seq_lens.device}")
        torch.ops.afdkit.mfa_plan(seq_lens, self.part_meta, self.batch_meta, self.o_partial, self.lse_partial,
                                  self.num_sm_parts)

    def matches(self, shape: DecodeShape) -> bool:
        return (self.batch, self.q_len, self.num_q_heads, self.num_kv_heads) == (
            shape.batch, shape.q_len, shape.num_q_heads, shape.num_kv_heads)


@torch.library.custom_op("afdkit::mfa_plan", mutates_args=("part_meta", "batch_meta"))
def _plan_op(seq_lens: torch.Tensor, part_meta: torch.Tensor, batch_meta: torch.Tensor,
             o_partial: torch.Tensor, lse_partial: torch.Tensor, num_sm_parts: int) -> None:
    from afdkit._dlpack import capsule, stream_of
    from afdkit._native import native

    native().mfa.plan(capsule(seq_lens), capsule(part_meta), capsule(batch_meta), capsule(o_partial),
                      capsule(lse_partial), num_sm_parts, stream_of(seq_lens))


# --------------------------------------------------------------------------- decode
@torch.library.custom_op("afdkit::mfa_decode_into",
                         mutates_args=("out", "lse", "o_partial", "lse_partial"))
def _decode_into(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                 seq_lens: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
                 softmax_scale: float, out: torch.Tensor, lse: torch.Tensor | None, part_meta: torch.Tensor | None,
                 batch_meta: torch.Tensor | None, o_partial: torch.Tensor | None, lse_partial: torch.Tensor | None,
                 num_sm_parts: int, simt: bool) -> None:
    if q.device.type != "cuda":
        from afdkit import reference

        res = reference.mfa_decode_reference(q, k_cache, v_cache, block_table, seq_lens, k_scale=k_scale,
                                             v_scale=v_scale, softmax_scale=softmax_scale, return_lse=lse is not None,
                                             dtype=torch.float32)
        o, l_ = res if lse is not None else (res, None)
        out.copy_(o)
        if lse is not None:
            lse.copy_(l_)
        return
    from afdkit._dlpack import capsule, stream_of
    from afdkit._native import native

    opt = lambda t: None if t is None else capsule(t)  # noqa: E731
    native().mfa.decode(capsule(q), capsule(k_cache), capsule(v_cache), opt(k_scale), opt(v_scale),
                        capsule(block_table), capsule(seq_lens), softmax_scale, capsule(out), opt(lse),
                        opt(part_meta), opt(batch_meta), opt(o_partial), opt(lse_partial), num_sm_parts, simt,
                        stream_of(q))


def decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
           seq_lens: torch.Tensor, *, k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
           softmax_scale: float | None = None, out: torch.Tensor | None = None, return_lse: bool = False,
           plan: DecodePlan | None = None, check_indices: bool = True,
           kernel: str = "sm90") -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Decode attention of ``q`` over the paged cache; returns ``out`` (and ``lse``).

    ``plan`` (CUDA): a :class:`DecodePlan` updated with these ``seq_lens``; without one a
    plan is made for this call (allocations: not for CUDA-graph capture). ``check_indices``
    reads ``seq_lens``/``block_table`` on the host to refuse out-of-range pages (one
    device-to-host copy; skipped during graph capture). ``kernel="simt"`` runs the fp32
    SIMT oracle kernel instead of the sm90 one.
    """
    shape = validate_decode(q, k_cache, v_cache, block_table, seq_lens, k_scale, v_scale, out, check_indices)
    if kernel not in ("sm90", "simt"):
        raise ValueError(f"afdkit.mfa.decode: kernel must be 'sm90' or 'simt', got {kernel!r}")
    scale = default_softmax_scale() if softmax_scale is None else float(softmax_scale)
    out = torch.empty_like(q) if out is None else out
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device) if return_lse else None
    if q.is_cuda and kernel == "sm90":
        if plan is None:
            plan = DecodePlan.create(q, k_cache)
            plan.update(seq_lens)
        elif not plan.matches(shape):
            raise ValueError(f"afdkit.mfa.decode: the plan was made for batch {plan.batch}, q_len {plan.q_len}, "
                             f"{plan.num_q_heads}/{plan.num_kv_heads} heads; this call has batch {shape.batch}, "
                             f"q_len {shape.q_len}, {shape.num_q_heads}/{shape.num_kv_heads} heads")
        parts = (plan.part_meta, plan.batch_meta, plan.o_partial, plan.lse_partial, plan.num_sm_parts)
    else:
        parts = (None, None, None, None, 0)
    ks = k_scale.reshape(1) if k_scale is not None and not shape.per_token_scale else k_scale
    vs = v_scale.reshape(1) if v_scale is not None and not shape.per_token_scale else v_scale
    torch.ops.afdkit.mfa_decode_into(q, k_cache, v_cache, block_table, seq_lens, ks, vs, scale, out, lse, *parts,
                                     kernel == "simt")
    return (out, lse) if return_lse else out


# ------------------------------------------------------------------------- append
@torch.library.custom_op("afdkit::mfa_append_kv", mutates_args=("k_cache", "v_cache", "k_scale", "v_scale"))
def _append_kv_op(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> None:
    if k.device.type != "cuda":
        from afdkit import reference

        reference.append_kv_reference(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
        return
    from afdkit._dlpack import capsule, stream_of
    from afdkit._native import native

    opt = lambda t: None if t is None else capsule(t)  # noqa: E731
    native().mfa.append_kv(capsule(k), capsule(v), capsule(k_cache), capsule(v_cache), capsule(slot_mapping),
                           opt(k_scale), opt(v_scale), stream_of(k))


def append_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
              v_scale: torch.Tensor | None = None) -> None:
    """Quantizes new K/V rows ``[tokens, num_kv_heads, 256]`` (bf16) into their cache slots.

    ``slot_mapping`` [tokens]: ``page * page_size + row`` (negative: skip). FP8 caches take
    per-tensor scales (one value each, inputs) or per-token scale caches
    ``[num_pages, page_size, num_kv_heads]`` that this call fills.
    """
    op = "afdkit.mfa.append_kv"
    _check_cache(op, k_cache, v_cache)
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: argument '{name}' must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.bfloat16:
            raise TypeError(f"{op}: argument '{name}' must have dtype bfloat16, got {t.dtype}")
        if t.dim() != 3 or t.shape[1:] != k_cache.shape[2:]:
            raise ValueError(f"{op}: argument '{name}' must have shape [tokens, {k_cache.shape[2]}, {HEAD_DIM}], "
                             f"got {list(t.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"{op}: 'k' and 'v' must have one shape, got {list(k.shape)} and {list(v.shape)}")
    if slot_mapping.dim() != 1 or slot_mapping.shape[0] != k.shape[0] or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{op}: argument 'slot_mapping' must be int32/int64 [{k.shape[0]}], "
                         f"got {slot_mapping.dtype}{list(slot_mapping.shape)}")
    per_token = _check_scale(op, "k_scale", k_scale, k_cache)
    if _check_scale(op, "v_scale", v_scale, v_cache) != per_token:
        raise ValueError(f"{op}: 'k_scale' and 'v_scale' must both be per-tensor or both per-token")
    chk.same_device(op, {"k": k, "v": v, "k_cache": k_cache, "v_cache": v_cache, "slot_mapping": slot_mapping,
                         "k_scale": k_scale, "v_scale": v_scale})
    if not (k.is_cuda and torch.cuda.is_current_stream_capturing()) and slot_mapping.numel():
        capacity = k_cache.shape[0] * k_cache.shape[1]
        hi = int(slot_mapping.max())
        if hi >= capacity:
            raise ValueError(f"{op}: slot_mapping has slot {hi}, beyond the cache's {capacity} slots")
    slots = slot_mapping.to(torch.int64).contiguous()
    ks = k_scale.reshape(1) if k_scale is not None and not per_token else k_scale
    vs = v_scale.reshape(1) if v_scale is not None and not per_token else v_scale
    torch.ops.afdkit.mfa_append_kv(k, v, k_cache, v_cache, slots, ks, vs)


__all__ = ["validate_decode", "default_softmax_scale", "DecodeShape", "DecodePlan", "decode", "append_kv",
           "HEAD_DIM", "PAGE_SIZES"]
