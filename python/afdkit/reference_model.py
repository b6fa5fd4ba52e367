"""Reference Step-3 blocks and a colocated greedy decode (fp32 math on the given weights).

Structure (as in the public ``step3_text`` model code of vLLM and SGLang), per layer::

    h = x + o_proj(MFA(input_layernorm(x)))
    u = post_attention_layernorm(h)
    x = h + (shared_expert(u) + sum_k w_k * expert_k(u)   if MoE layer
             mlp(u)                                         otherwise)

and ``logits = lm_head(norm(x))``. MFA: ``[q_lat | k | v] = x W_qkv_a``,
``q = wq(inter_norm(q_lat))`` split into heads, RoPE (NeoX rotate-half over the whole
head_dim) on q and k, K cached after RoPE, one K/V head shared by all query heads.

These functions are the oracle for the AFD runtime: AFD decode must produce the same
greedy tokens as :func:`greedy_decode` on the tiny model. Everything is re-exported by
:mod:`afdkit.reference`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from afdkit.models.step3 import Step3Config, Step3Weights
from afdkit.reference import (
    FP8_DTYPE,
    append_kv_reference,
    dequantize_fp8,
    mfa_decode_reference,
    quantize_fp8,
    slot_mapping_for,
)

FFNWire = Literal["fp32", "afd"]

# ============================================================================ elementwise blocks


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last dim, in fp32."""
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.float()


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``/``sin`` of ``position * theta^(-2j/head_dim)``, ``[..., head_dim // 2]`` fp32.

    Angles are formed in fp64 (positions up to 64K times frequencies near 1 would lose
    bits in fp32) and rounded once.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim
    inv_freq = 1.0 / (float(theta) ** exponents)
    angles = positions.to(torch.float64).unsqueeze(-1) * inv_freq
    return torch.cos(angles).float(), torch.sin(angles).float()


def rope_neox(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """NeoX rotate-half RoPE over the full head dim: ``x [..., heads, D]``, ``positions [...]``.

    Pairs are ``(x[j], x[j + D/2])``: ``(x1 cos - x2 sin, x2 cos + x1 sin)``. fp32 out.
    """
    cos, sin = rope_cos_sin(positions, x.shape[-1], theta)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)     # broadcast over heads
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up = [gate | up]`` along the last dim."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu(u: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """``down(silu(gate u) * up u)``; weights ``[out, in]``; fp32."""
    uf = u.float()
    return (F.silu(uf @ gate.float().T) * (uf @ up.float().T)) @ down.float().T


def dense_ffn(u: torch.Tensor, weights: Step3Weights, layer: int) -> torch.Tensor:
    """The dense SwiGLU FFN of a dense layer (``mlp.*``)."""
    return swiglu(u, weights.layer(layer, "mlp.gate_proj"), weights.layer(layer, "mlp.up_proj"),
                  weights.layer(layer, "mlp.down_proj"))


# ============================================================================ MoE


def router_topk(
    logits: torch.Tensor, top_k: int, scoring: str = "softmax", renormalize: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores experts and keeps the ``top_k`` best per token: ``(weights fp32, ids int64)``.

    ``scoring``: ``"softmax"`` over experts (Step-3) or ``"sigmoid"`` per expert, in fp32.
    Order: descending score, ties by lower expert id (a stable sort). Weights are the
    scores themselves unless ``renormalize`` (then divided by their sum; Step-3: not).
    """
    lf = logits.float()
    if scoring == "softmax":
        scores = torch.softmax(lf, dim=-1)
    elif scoring == "sigmoid":
        scores = torch.sigmoid(lf)
    else:
        raise ValueError(f"scoring must be 'softmax' or 'sigmoid', got {scoring!r}")
    if not 1 <= top_k <= logits.shape[-1]:
        raise ValueError(f"top_k must be in 1..{logits.shape[-1]}, got {top_k}")
    values, ids = torch.sort(scores, dim=-1, descending=True, stable=True)
    weights, ids = values[..., :top_k].contiguous(), ids[..., :top_k].contiguous()
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def routed_experts_reference(
    u: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """``sum_k w[t, k] * expert_{ids[t, k]}(u[t])`` by a loop over experts; fp32 ``[T, H]``.

    ``u [T, H]``; ``gate``/``up [E, I, H]``, ``down [E, H, I]`` (checkpoint layout).
    """
    out = torch.zeros(u.shape[0], down.shape[1], dtype=torch.float32, device=u.device)
    for e in torch.unique(topk_ids).tolist():
        tok, slot = (topk_ids == e).nonzero(as_tuple=True)
        y = swiglu(u[tok], gate[e], up[e], down[e])
        out.index_add_(0, tok, topk_weights[tok, slot].float().unsqueeze(-1) * y)
    return out


def moe_router(u: torch.Tensor, weights: Step3Weights, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step-3 routing of ``u [..., H]``: ``moe.gate`` logits, softmax, top-k, not
    renormalised; returns ``(weights fp32 [T, k], ids int64 [T, k])`` over flattened tokens."""
    c = weights.config
    logits = u.reshape(-1, u.shape[-1]).float() @ weights.layer(layer, "moe.gate").float().T
    return router_topk(logits, c.moe_top_k, "softmax", c.norm_expert_weight)


def moe_ffn(
    u: torch.Tensor,
    weights: Step3Weights,
    layer: int,
    *,
    topk_weights: torch.Tensor | None = None,
    topk_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Step-3 MoE FFN: ``shared(u) + sum_k w_k * expert_k(u)``; ``u [..., H]`` -> fp32.

    The router (``moe.gate``, softmax, top-k, not renormalised) runs here unless the
    routing is given (in AFD the attention side routes and ships ids and weights).
    """
    flat = u.reshape(-1, u.shape[-1]).float()
    if topk_ids is None or topk_weights is None:
        topk_weights, topk_ids = moe_router(flat, weights, layer)
    shared = swiglu(flat, weights.layer(layer, "share_expert.gate_proj"),
                    weights.layer(layer, "share_expert.up_proj"), weights.layer(layer, "share_expert.down_proj"))
    routed = routed_experts_reference(
        flat, weights.layer(layer, "moe.gate_proj"), weights.layer(layer, "moe.up_proj"),
        weights.layer(layer, "moe.down_proj"), topk_weights.reshape(flat.shape[0], -1),
        topk_ids.reshape(flat.shape[0], -1))
    return (shared + routed).reshape(u.shape)


# ============================================================================ attention


@dataclass
class PagedKVCache:
    """One layer's paged K/V: ``[num_pages, page_size, num_kv_heads, head_dim]`` each,
    with FP8 scales (one value, or ``[num_pages, page_size, num_kv_heads]``) or None."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None

    @property
    def page_size(self) -> int:
        return self.k.shape[1]


def allocate_kv_caches(
    config: Step3Config,
    num_pages: int,
    page_size: int,
    kv_dtype: torch.dtype = FP8_DTYPE,
    kv_scale: float | None = None,
    device: torch.device | str = "cpu",
) -> list[PagedKVCache]:
    """One NaN-filled cache per layer (unwritten memory must never reach the math).

    FP8 caches get a per-tensor scale ``kv_scale`` if given, else per-token scales
    (NaN-filled too, written on append).
    """
    shape = (num_pages, page_size, config.num_kv_heads, config.head_dim)

    def scale() -> torch.Tensor | None:
        if kv_dtype != FP8_DTYPE:
            return None
        if kv_scale is not None:
            return torch.tensor([float(kv_scale)], dtype=torch.float32, device=device)
        return torch.full(shape[:3], float("nan"), dtype=torch.float32, device=device)

    def poisoned() -> torch.Tensor:
        return torch.full(shape, float("nan"), device=device).to(kv_dtype)

    return [PagedKVCache(poisoned(), poisoned(), scale(), scale()) for _ in range(config.num_hidden_layers)]


def mfa_project_qkv(
    xn: torch.Tensor, weights: Step3Weights, layer: int, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MFA projections of the normed input ``xn [..., H]`` at ``positions [...]``.

    Returns fp32 ``q [..., Hq, D]`` and ``k``/``v [..., Hkv, D]``, RoPE applied to q, k.
    """
    c = weights.config
    w_qkv_a = torch.cat([weights.layer(layer, "self_attn.q_proj"), weights.layer(layer, "self_attn.k_proj"),
                         weights.layer(layer, "self_attn.v_proj")]).float()
    a = xn.float() @ w_qkv_a.T
    q_lat, k, v = a.split([c.share_q_dim, c.kv_size, c.kv_size], dim=-1)
    q_lat = rms_norm(q_lat, weights.layer(layer, "self_attn.inter_norm"), c.rms_norm_eps)
    q = (q_lat @ weights.layer(layer, "self_attn.wq").float().T).unflatten(-1, (c.num_attention_heads, c.head_dim))
    k = k.unflatten(-1, (c.num_kv_heads, c.head_dim))
    v = v.unflatten(-1, (c.num_kv_heads, c.head_dim))
    return rope_neox(q, positions, c.rope_theta), rope_neox(k, positions, c.rope_theta), v


def new_positions(seq_lens: torch.Tensor, q_len: int) -> torch.Tensor:
    """Positions ``[batch, q_len]`` of the newest ``q_len`` tokens of each sequence."""
    return seq_lens.long().unsqueeze(1) - q_len + torch.arange(q_len, device=seq_lens.device)


def step3_attention_block(
    x: torch.Tensor,
    weights: Step3Weights,
    layer: int,
    cache: PagedKVCache,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    attn_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``o_proj(MFA(input_layernorm(x)))`` for new tokens ``x [batch, q_len, H]``.

    ``seq_lens`` count the new tokens; their K/V are appended to ``cache`` (in place)
    before attention reads it back, so attention sees the cached (e.g. FP8) K/V.
    """
    c = weights.config
    batch, q_len = x.shape[:2]
    xn = rms_norm(x, weights.layer(layer, "input_layernorm"), c.rms_norm_eps)
    positions = new_positions(seq_lens, q_len)
    q, k, v = mfa_project_qkv(xn, weights, layer, positions)
    slots = slot_mapping_for(block_table, positions, cache.page_size).reshape(-1)
    append_kv_reference(k.reshape(-1, c.num_kv_heads, c.head_dim), v.reshape(-1, c.num_kv_heads, c.head_dim),
                        cache.k, cache.v, slots, cache.k_scale, cache.v_scale)
    o = mfa_decode_reference(q, cache.k, cache.v, block_table, seq_lens, k_scale=cache.k_scale,
                             v_scale=cache.v_scale, softmax_scale=c.softmax_scale, dtype=attn_dtype)
    return o.flatten(-2) @ weights.layer(layer, "self_attn.o_proj").float().T


# ============================================================================ model


def ffn_wire_in(u: torch.Tensor, wire: FFNWire) -> torch.Tensor:
    """What the FFN side receives: ``u`` itself (``"fp32"``) or, as AFD ships it,
    ``u`` through FP8 e4m3 with one scale per token per 128 channels (``"afd"``)."""
    if wire == "fp32":
        return u
    if wire == "afd":
        q, s = quantize_fp8(u, "channel128")
        return dequantize_fp8(q, s, "channel128")
    raise ValueError(f"ffn_wire must be 'fp32' or 'afd', got {wire!r}")


def ffn_wire_out(y: torch.Tensor, wire: FFNWire) -> torch.Tensor:
    """What the attention side adds back: ``y`` (``"fp32"``) or ``y`` rounded to bf16 (``"afd"``)."""
    return y.to(torch.bfloat16).float() if wire == "afd" else y


def step3_layer(
    x: torch.Tensor,
    weights: Step3Weights,
    layer: int,
    cache: PagedKVCache,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    ffn_wire: FFNWire = "fp32",
) -> torch.Tensor:
    """One decoder layer (pre-norm, residual adds) on ``x [batch, q_len, H]``; fp32.

    ``ffn_wire="afd"`` applies AFD's wire formats around the FFN (FP8 + per-128-channel
    scales in, bf16 out); the router always sees the unquantized ``u``, as the attention
    side routes before sending.
    """
    c = weights.config
    h = x.float() + step3_attention_block(x, weights, layer, cache, block_table, seq_lens)
    u = rms_norm(h, weights.layer(layer, "post_attention_layernorm"), c.rms_norm_eps)
    if c.is_moe_layer(layer):
        w, ids = moe_router(u, weights, layer)
        ffn = moe_ffn(ffn_wire_in(u, ffn_wire), weights, layer, topk_weights=w, topk_ids=ids)
    else:
        ffn = dense_ffn(ffn_wire_in(u, ffn_wire), weights, layer)
    return h + ffn_wire_out(ffn, ffn_wire)


def decode_step(
    weights: Step3Weights,
    caches: list[PagedKVCache],
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    token_ids: torch.Tensor,
    *,
    ffn_wire: FFNWire = "fp32",
) -> torch.Tensor:
    """Runs new tokens ``token_ids [batch, q_len]`` through the model; fp32 logits ``[batch, q_len, V]``.

    ``seq_lens`` count the new tokens (positions ``seq_len - q_len .. seq_len - 1``).
    """
    c = weights.config
    x = weights["model.embed_tokens.weight"][token_ids.long()].float()
    for i in range(c.num_hidden_layers):
        x = step3_layer(x, weights, i, caches[i], block_table, seq_lens, ffn_wire=ffn_wire)
    x = rms_norm(x, weights["model.norm.weight"], c.rms_norm_eps)
    return x @ weights.lm_head.float().T


def _permuted_block_table(batch: int, pages_per_seq: int, num_pages: int, device: torch.device) -> torch.Tensor:
    """A fixed scatter of pages over sequences, so the decode exercises non-trivial tables."""
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(num_pages, generator=gen)[: batch * pages_per_seq]
    return perm.view(batch, pages_per_seq).to(device=device, dtype=torch.int32)


@torch.no_grad()
def greedy_decode(
    config: Step3Config,
    weights: Step3Weights,
    prompt_ids: torch.Tensor,
    steps: int,
    *,
    page_size: int = 16,
    kv_dtype: torch.dtype = FP8_DTYPE,
    kv_scale: float | None = None,
    ffn_wire: FFNWire = "fp32",
    return_logits: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Colocated greedy decode: prefill the prompt in one pass, then ``steps`` tokens.

    ``prompt_ids [batch, prompt_len]``; returns generated ids ``[batch, steps]`` int64
    (argmax, first index on ties) and, with ``return_logits``, the fp32 logits that chose
    them ``[batch, steps, vocab]`` (to tell a real mismatch from a near-tie). KV cache:
    paged, ``kv_dtype`` FP8 (per-token scales, or the per-tensor ``kv_scale``) or
    bf16/fp32. ``ffn_wire`` as in :func:`step3_layer`. Deterministic for given weights.
    """
    if weights.config != config:
        raise ValueError("greedy_decode: weights were made for a different config")
    if prompt_ids.dim() != 2 or prompt_ids.shape[1] < 1 or steps < 1:
        raise ValueError(f"greedy_decode: need prompt_ids [batch, >=1] and steps >= 1, got "
                         f"{list(prompt_ids.shape)} and {steps}")
    batch, prompt_len = prompt_ids.shape
    device = prompt_ids.device
    pages_per_seq = -(-(prompt_len + steps) // page_size)
    num_pages = batch * pages_per_seq + 1          # one page never used: stays NaN
    caches = allocate_kv_caches(config, num_pages, page_size, kv_dtype, kv_scale, device)
    block_table = _permuted_block_table(batch, pages_per_seq, num_pages, device)
    seq_lens = torch.full((batch,), prompt_len, dtype=torch.int32, device=device)
    step_logits = [decode_step(weights, caches, block_table, seq_lens, prompt_ids, ffn_wire=ffn_wire)[:, -1]]
    tokens = [step_logits[-1].argmax(dim=-1)]
    for _ in range(steps - 1):
        seq_lens = seq_lens + 1
        logits = decode_step(weights, caches, block_table, seq_lens, tokens[-1].unsqueeze(1), ffn_wire=ffn_wire)
        step_logits.append(logits[:, -1])
        tokens.append(step_logits[-1].argmax(dim=-1))
    out = torch.stack(tokens, dim=1)
    return (out, torch.stack(step_logits, dim=1)) if return_logits else out


__all__ = [
    "rms_norm", "rope_neox", "rope_cos_sin", "silu_and_mul", "swiglu", "dense_ffn",
    "router_topk", "routed_experts_reference", "moe_router", "moe_ffn",
    "PagedKVCache", "allocate_kv_caches", "mfa_project_qkv", "new_positions", "step3_attention_block",
    "FFNWire", "ffn_wire_in", "ffn_wire_out", "step3_layer", "decode_step", "greedy_decode",
]
