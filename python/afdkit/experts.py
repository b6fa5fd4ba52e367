"""Expert compute for the FFN side: SwiGLU experts over expert-major rows, plus the shared expert.

On CUDA the routed experts run as FP8 grouped GEMMs (``torch._scaled_grouped_mm`` with
row-wise scales: one per token row, one per weight output channel); on CPU, or where
torch lacks the grouped kernel, a plain per-expert loop in fp32 does the same math.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from afdkit import moe
from afdkit.quant import quantize_fp8


@dataclass
class FP8ExpertWeights:
    """Routed experts in FP8 with one scale per output channel.

    ``gate_up``: [E, 2 * inter, hidden] e4m3 (gate rows first), ``gate_up_scale``: [E, 2 * inter];
    ``down``: [E, hidden, inter] e4m3, ``down_scale``: [E, hidden].
    """

    gate_up: torch.Tensor
    gate_up_scale: torch.Tensor
    down: torch.Tensor
    down_scale: torch.Tensor

    @classmethod
    def from_dense(cls, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> "FP8ExpertWeights":
        """gate/up: [E, inter, hidden], down: [E, hidden, inter] (any float dtype)."""
        gate_up = torch.cat([gate, up], dim=1).float()
        gu_q, gu_s = quantize_fp8(gate_up.reshape(-1, gate_up.shape[-1]), "token")
        d_q, d_s = quantize_fp8(down.float().reshape(-1, down.shape[-1]), "token")
        e = gate.shape[0]
        return cls(gu_q.view(gate_up.shape), gu_s.view(e, -1), d_q.view(down.shape), d_s.view(e, -1))

    @property
    def num_experts(self) -> int:
        return self.gate_up.shape[0]

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.gate_up.float() * self.gate_up_scale[..., None],
                self.down.float() * self.down_scale[..., None])


def _swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def experts_loop(rows: torch.Tensor, offsets: torch.Tensor, w: FP8ExpertWeights) -> torch.Tensor:
    """Reference-speed path: one fp32 matmul pair per expert over its slice of rows."""
    gate_up_w, down_w = w.dequantized()
    out = torch.empty(rows.shape[0], down_w.shape[1], dtype=torch.float32, device=rows.device)
    bounds = offsets.tolist()
    for e in range(w.num_experts):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            out[lo:hi] = _swiglu(rows[lo:hi].float() @ gate_up_w[e].T) @ down_w[e].T
    return out


def _grouped_fp8(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                 ends: torch.Tensor) -> torch.Tensor:
    # b is [E, N, K] row-major; the kernel wants [E, K, N] column-major, i.e. its transpose view.
    return torch._scaled_grouped_mm(a, b.transpose(-2, -1), a_scale, b_scale, offs=ends, out_dtype=torch.bfloat16)


def experts_grouped(rows: torch.Tensor, offsets: torch.Tensor, w: FP8ExpertWeights) -> torch.Tensor:
    """FP8 grouped GEMMs on CUDA: rows [M, hidden] (any float dtype), offsets [E + 1] int32."""
    ends = offsets[1:].to(torch.int32)
    a, a_scale = quantize_fp8(rows.to(torch.bfloat16), "token")
    h = _grouped_fp8(a, a_scale.reshape(-1), w.gate_up, w.gate_up_scale, ends)
    act = _swiglu(h.float()).to(torch.bfloat16)
    a2, a2_scale = quantize_fp8(act, "token")
    return _grouped_fp8(a2, a2_scale.reshape(-1), w.down, w.down_scale, ends)


def routed_experts(rows: torch.Tensor, offsets: torch.Tensor, w: FP8ExpertWeights) -> torch.Tensor:
    if rows.is_cuda and hasattr(torch, "_scaled_grouped_mm"):
        return experts_grouped(rows, offsets, w)
    return experts_loop(rows, offsets, w)


def moe_layer(u: torch.Tensor, router_logits: torch.Tensor, w: FP8ExpertWeights, top_k: int,
              shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``h = shared(u) + sum_k w_k * expert_k(u)`` on one device (Step-3's MoE block).

    ``shared`` = (gate [I, H], up [I, H], down [H, I]) applied to every token, in u's dtype.
    """
    weights, ids = moe.route(router_logits, top_k)
    permuted = moe.permute(u, ids, w.num_experts, quant="none", check_ids=False)  # route's ids are in range
    y = routed_experts(permuted.x, permuted.expert_offsets, w)
    out = moe.unpermute(y.to(torch.bfloat16), permuted, weights).float()
    if shared is not None:
        g, up, d = shared
        out = out + (torch.nn.functional.silu(u @ g.T.to(u.dtype)) * (u @ up.T.to(u.dtype))).float() @ d.T.float()
    return out.to(torch.bfloat16)


__all__ = ["FP8ExpertWeights", "experts_loop", "experts_grouped", "routed_experts", "moe_layer"]
