"""Step-3 decoder layers from afdkit ops, split into their attention and FFN halves.

:class:`AttentionStack` (what an attention worker holds): embedding, per layer the
input norm, the fused low-rank Q + K + V projection, the query latent's norm, ``wq``,
RoPE, ``mfa.append_kv`` + ``mfa.decode`` over the paged FP8 cache, ``o_proj``, the
residual add and the post-attention norm (giving ``u``), the MoE router, and the final
norm + LM head. :class:`FFNShard` (what an FFN worker holds): its share of every
layer's FFN, see :mod:`afdkit.runtime.ffn`.

One decode step of layer ``l`` on a microbatch::

    h, u = stack.attention(l, x, kv, mb)        # attention worker
    w, ids = stack.route(l, u)                  # attention worker (MoE layers)
    y = sum over FFN ranks f of shard_f(l, u_wire, ids, w)   # FFN workers, bf16 partials
    x = h + y
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from afdkit import mfa, moe
from afdkit.models.step3 import Step3Config
from afdkit.runtime.checkpoint import TensorSource, check_source
from afdkit.runtime.kv import KVState, MicroBatch
from afdkit.runtime.numerics import Numerics


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, work: torch.dtype) -> torch.Tensor:
    xf = x.to(work)
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.to(work)
    return y.to(x.dtype)


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float, work: torch.dtype) -> torch.Tensor:
    """NeoX rotate-half RoPE over the whole head dim: ``x [T, heads, D]``, ``positions [T]``."""
    d = x.shape[-1]
    inv_freq = 1.0 / (float(theta) ** (torch.arange(0, d, 2, dtype=torch.float64, device=x.device) / d))
    angles = positions.to(torch.float64).unsqueeze(-1) * inv_freq
    cos, sin = torch.cos(angles).to(work).unsqueeze(-2), torch.sin(angles).to(work).unsqueeze(-2)
    x1, x2 = x.to(work).chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


@dataclass
class AttentionLayerWeights:
    input_norm: torch.Tensor
    qkv_a: torch.Tensor        # [share_q_dim + 2 * 256, H]: q_proj, k_proj, v_proj fused
    inter_norm: torch.Tensor
    wq: torch.Tensor           # [heads * 256, share_q_dim]
    o_proj: torch.Tensor       # [H, heads * 256]
    post_norm: torch.Tensor
    router: torch.Tensor | None  # [experts, H] (MoE layers)


def attention_tensor_names(config: Step3Config, layers: range) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight",
             "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"]
    for i in layers:
        p = f"model.layers.{i}."
        names += [p + s for s in ("input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                  "self_attn.v_proj.weight", "self_attn.inter_norm.weight", "self_attn.wq.weight",
                                  "self_attn.o_proj.weight", "post_attention_layernorm.weight")]
        if config.is_moe_layer(i):
            names.append(p + "moe.gate.weight")
    return names


class AttentionStack:
    """The attention halves of layers ``0 .. num_layers - 1`` plus embedding and LM head."""

    def __init__(self, config: Step3Config, source: TensorSource, numerics: Numerics) -> None:
        self.config, self.numerics = config, numerics
        layers = range(config.num_hidden_layers)
        check_source(config, source, attention_tensor_names(config, layers))
        cd, dev = numerics.compute_dtype, numerics.device

        def get(name: str) -> torch.Tensor:
            return source.tensor(name).to(device=dev, dtype=cd)

        self.embed = get("model.embed_tokens.weight")
        self.final_norm = get("model.norm.weight")
        self.lm_head = get("model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight")
        self.layers: list[AttentionLayerWeights] = []
        for i in layers:
            p = f"model.layers.{i}."
            qkv = torch.cat([source.tensor(p + f"self_attn.{n}_proj.weight") for n in ("q", "k", "v")])
            self.layers.append(AttentionLayerWeights(
                get(p + "input_layernorm.weight"), qkv.to(device=dev, dtype=cd), get(p + "self_attn.inter_norm.weight"),
                get(p + "self_attn.wq.weight"), get(p + "self_attn.o_proj.weight"),
                get(p + "post_attention_layernorm.weight"),
                get(p + "moe.gate.weight") if config.is_moe_layer(i) else None))

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.embed[token_ids.to(self.embed.device).long()]

    def attention(self, layer: int, x: torch.Tensor, kv: KVState, mb: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [n, H]`` (the microbatch's hidden states, one new token each) ->
        ``(h, u)``: the residual after attention and its post-attention norm."""
        c, w, nm = self.config, self.layers[layer], self.numerics
        work, eps, hd = nm.work_dtype, c.rms_norm_eps, c.head_dim
        n = x.shape[0]
        xn = rms_norm(x, w.input_norm, eps, work)
        q_lat, k, v = F.linear(xn, w.qkv_a).split([c.share_q_dim, hd, hd], dim=-1)
        q = F.linear(rms_norm(q_lat, w.inter_norm, eps, work), w.wq).view(n, c.num_attention_heads, hd)
        q = rope(q, mb.positions, c.rope_theta, work)
        k = rope(k.reshape(n, 1, hd), mb.positions, c.rope_theta, work)
        cache = kv.layers[layer]
        k_new, v_new = k.to(torch.bfloat16).contiguous(), v.reshape(n, 1, hd).to(torch.bfloat16).contiguous()
        if nm.check_indices:
            mfa.append_kv(k_new, v_new, cache.k, cache.v, mb.slots, cache.k_scale, cache.v_scale)
        else:
            # The op without the wrapper's checks: their slot range check reads the slots on
            # the host (a device sync per layer and microbatch). Shapes are fixed by KVState
            # and the slots come from its block table, so the checks cannot fail here.
            torch.ops.afdkit.mfa_append_kv(k_new, v_new, cache.k, cache.v, mb.slots, cache.k_scale, cache.v_scale)
        o = mfa.decode(q.to(torch.bfloat16).unsqueeze(1), cache.k, cache.v, mb.block_table, mb.seq_lens,
                       k_scale=cache.k_scale, v_scale=cache.v_scale, softmax_scale=c.softmax_scale, plan=mb.plan,
                       check_indices=nm.check_indices)
        h = x + F.linear(o.view(n, c.q_size).to(nm.compute_dtype), w.o_proj)
        return h, rms_norm(h, w.post_norm, eps, work)

    def route(self, layer: int, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Step-3's router on the attention side: softmax over experts, top-k, weights
        not renormalised. Returns (weights fp32 [n, k], ids int32 [n, k])."""
        gate = self.layers[layer].router
        if gate is None:
            raise ValueError(f"afdkit.runtime: layer {layer} is dense; it has no router")
        logits = F.linear(u, gate).float()
        return moe.route(logits, self.config.moe_top_k, "softmax", self.config.norm_expert_weight)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        xn = rms_norm(x, self.final_norm, self.config.rms_norm_eps, self.numerics.work_dtype)
        return F.linear(xn, self.lm_head).float()


__all__ = ["AttentionStack", "AttentionLayerWeights", "attention_tensor_names", "rms_norm", "rope"]
