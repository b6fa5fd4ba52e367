"""An FFN worker's share of the model: dense SwiGLU layers, routed experts, shared expert.

Two ways to split the FFN over ``N`` FFN ranks (:class:`ShardSpec`):

``broadcast`` (tensor parallel): every rank gets every row and holds a contiguous
slice (``I / N`` wide, balanced when uneven) of every intermediate dimension: of the dense FFN, of
each routed expert and of the shared expert. Its result is a partial sum; the
attention side adds the partials.

``routed`` (expert parallel): rank ``f`` holds whole experts (``expert_owner[e] == f``)
and a row of an MoE layer goes only to the ranks owning one of its top-k experts, plus
its *home* rank (``home = global sequence id % N``), which also applies the shared
expert to it (every rank holds the whole shared expert; homes spread its work evenly).
Dense layers stay tensor-parallel: their rows go to every rank. A rank's partial for a
row is ``[home] shared(u) + sum over its experts k of w_k expert_k(u)``.

Math: CPU in float64 with the unquantized weights (exact per row; see
:mod:`afdkit.runtime.numerics`); CUDA in bf16 with the routed experts in FP8
(:class:`afdkit.experts.FP8ExpertWeights`, grouped GEMMs), through ``moe.permute`` /
``unpermute``. ``Numerics.fp8_experts`` selects the FP8 path on CPU too (its reference
fallbacks), which is how CPU tests cover the GPU code path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from afdkit import experts as fp8x
from afdkit import moe
from afdkit.models.step3 import Step3Config
from afdkit.runtime.checkpoint import TensorSource, check_source
from afdkit.runtime.numerics import Numerics

MODES = ("broadcast", "routed")


@dataclass(frozen=True)
class ShardSpec:
    mode: str                         # "broadcast" (TP) or "routed" (EP)
    index: int                        # this FFN rank among the FFN ranks
    count: int                        # number of FFN ranks
    expert_owner: tuple[int, ...] = ()  # routed: expert id -> FFN index

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"afdkit.runtime: FFN mode must be one of {MODES}, got {self.mode!r}")
        if not 0 <= self.index < self.count:
            raise ValueError(f"afdkit.runtime: FFN index {self.index} outside [0, {self.count})")
        if self.mode == "routed":
            if any(not 0 <= o < self.count for o in self.expert_owner):
                raise ValueError(f"afdkit.runtime: expert_owner names FFN ranks outside [0, {self.count})")
            idle = sorted(set(range(self.count)) - set(self.expert_owner))
            if idle:
                raise ValueError(f"afdkit.runtime: routed mode needs experts on every FFN rank; {idle} own none")

    @property
    def local_experts(self) -> list[int]:
        return [e for e, o in enumerate(self.expert_owner) if o == self.index]


def default_expert_owner(num_experts: int, num_ffn: int) -> tuple[int, ...]:
    """Contiguous blocks of experts per FFN rank (the first ranks take one more if uneven)."""
    if num_ffn > num_experts:
        raise ValueError(f"afdkit.runtime: {num_ffn} FFN ranks cannot share {num_experts} experts in routed mode")
    return tuple(e * num_ffn // num_experts for e in range(num_experts))


def _tp_range(width: int, spec: ShardSpec, what: str) -> tuple[int, int]:
    """(start, length) of this rank's slice of an intermediate dimension: balanced
    contiguous slices (sizes differ by at most one) in broadcast mode and for dense
    layers; the whole width for experts and the shared expert in routed mode."""
    if spec.mode == "broadcast" or what == "dense":
        if width < spec.count:
            raise ValueError(f"afdkit.runtime: the {what} width {width} cannot split over {spec.count} FFN ranks")
        base, extra = divmod(width, spec.count)
        return spec.index * base + min(spec.index, extra), base + (1 if spec.index < extra else 0)
    return 0, width


@dataclass
class SwiGLUWeights:
    gate_up: torch.Tensor  # [2 * I, H]: gate rows, then up rows
    down: torch.Tensor     # [H, I]

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(u, self.gate_up).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down)


@dataclass
class MoEShardWeights:
    experts: list[int]                    # global ids of the experts held (all, or owned)
    dense: SwiGLUWeights | None           # CPU path: stacked [E_local, 2I, H] / [E_local, H, I]
    fp8: fp8x.FP8ExpertWeights | None     # FP8 path
    shared: SwiGLUWeights
    local_of: torch.Tensor                # [num_experts] int64: local index, -1 if not held


def _fp8_experts(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                 device: torch.device) -> fp8x.FP8ExpertWeights:
    """``FP8ExpertWeights.from_dense`` one expert at a time: the same per-output-channel
    scales, without an fp32 copy of all experts at once (14 GB at Step-3's width)."""
    from afdkit.quant import quantize_fp8

    e, inter, hidden = gate.shape
    gu = torch.empty(e, 2 * inter, hidden, dtype=torch.float8_e4m3fn, device=device)
    gu_s = torch.empty(e, 2 * inter, dtype=torch.float32, device=device)
    dn = torch.empty(e, hidden, inter, dtype=torch.float8_e4m3fn, device=device)
    dn_s = torch.empty(e, hidden, dtype=torch.float32, device=device)
    for i in range(e):
        q, sc = quantize_fp8(torch.cat([gate[i], up[i]]).to(device=device, dtype=torch.float32).contiguous(), "token")
        gu[i], gu_s[i] = q, sc.view(-1)
        q, sc = quantize_fp8(down[i].to(device=device, dtype=torch.float32).contiguous(), "token")
        dn[i], dn_s[i] = q, sc.view(-1)
    return fp8x.FP8ExpertWeights(gu, gu_s, dn, dn_s)


def ffn_tensor_names(config: Step3Config, layers: range) -> list[str]:
    out = []
    for i in layers:
        p = f"model.layers.{i}."
        parts = (["moe.gate_proj", "moe.up_proj", "moe.down_proj", "share_expert.gate_proj",
                  "share_expert.up_proj", "share_expert.down_proj"] if config.is_moe_layer(i)
                 else ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"])
        out += [p + s + ".weight" for s in parts]
    return out


class FFNShard:
    """This FFN rank's part of every layer's FFN (see the module docstring)."""

    def __init__(self, config: Step3Config, source: TensorSource, spec: ShardSpec, numerics: Numerics) -> None:
        self.config, self.spec, self.numerics = config, spec, numerics
        check_source(config, source, ffn_tensor_names(config, range(config.num_hidden_layers)))
        self.layers: list[SwiGLUWeights | MoEShardWeights] = []
        for i in range(config.num_hidden_layers):
            self.layers.append(self._load_moe(source, i) if config.is_moe_layer(i) else self._load_dense(source, i))

    def _to(self, t: torch.Tensor) -> torch.Tensor:
        # contiguous(): a slice must not keep the whole tensor it was cut from alive.
        return t.to(device=self.numerics.device, dtype=self.numerics.compute_dtype).contiguous()

    def _swiglu(self, source: TensorSource, prefix: str, width: int, what: str) -> SwiGLUWeights:
        start, n = _tp_range(width, self.spec, what)
        gate = source.narrow(prefix + "gate_proj.weight", 0, start, n)
        up = source.narrow(prefix + "up_proj.weight", 0, start, n)
        down = source.narrow(prefix + "down_proj.weight", 1, start, n)
        return SwiGLUWeights(self._to(torch.cat([gate, up])), self._to(down))

    def _load_dense(self, source: TensorSource, i: int) -> SwiGLUWeights:
        return self._swiglu(source, f"model.layers.{i}.mlp.", self.config.intermediate_size, "dense")

    def _load_moe(self, source: TensorSource, i: int) -> MoEShardWeights:
        c, s = self.config, self.spec
        p = f"model.layers.{i}."
        held = list(range(c.moe_num_experts)) if s.mode == "broadcast" else s.local_experts
        start, n = _tp_range(c.moe_intermediate_size, s, "expert")
        gate = source.select(p + "moe.gate_proj.weight", held).narrow(1, start, n)
        up = source.select(p + "moe.up_proj.weight", held).narrow(1, start, n)
        down = source.select(p + "moe.down_proj.weight", held).narrow(2, start, n)
        local_of = torch.full((c.moe_num_experts,), -1, dtype=torch.long)
        local_of[torch.as_tensor(held, dtype=torch.long)] = torch.arange(len(held))
        dense = fp8 = None
        if self.numerics.fp8_experts:
            fp8 = _fp8_experts(gate, up, down, self.numerics.device)
        else:
            dense = SwiGLUWeights(self._to(torch.cat([gate, up], dim=1)), self._to(down))
        shared = self._swiglu(source, p + "share_expert.", c.share_expert_dim, "shared expert")
        return MoEShardWeights(held, dense, fp8, shared, local_of.to(self.numerics.device))

    def forward(self, layer: int, u: torch.Tensor, topk_ids: torch.Tensor | None, topk_weights: torch.Tensor | None,
                home: torch.Tensor | None) -> torch.Tensor:
        """This rank's partial FFN output for rows ``u [R, H]`` (compute dtype); the
        result is in the compute dtype. ``home [R] bool`` (routed MoE layers): rows
        whose shared expert this rank applies."""
        w = self.layers[layer]
        if isinstance(w, SwiGLUWeights):
            return w(u)
        if topk_ids is None or topk_weights is None:
            raise ValueError(f"afdkit.runtime: MoE layer {layer} needs the rows' top-k ids and weights")
        if self.spec.mode == "broadcast":
            out = w.shared(u)
        else:
            if home is None:
                raise ValueError("afdkit.runtime: routed MoE layers need each row's home flag")
            # Every received row through the shared expert, kept where this rank is home:
            # decode is bound by reading weights, and a mask needs no host sync.
            out = torch.where(home.unsqueeze(-1), w.shared(u), torch.zeros((), dtype=u.dtype, device=u.device))
        local = w.local_of[topk_ids.long()]          # [R, k]: -1 where another rank holds the expert
        if w.fp8 is not None:
            return out + self._experts_fp8(w, u, local, topk_weights).to(out.dtype)
        return self._experts_exact(w, u, local, topk_weights, out)

    @staticmethod
    def _experts_exact(w: MoEShardWeights, u: torch.Tensor, local: torch.Tensor, topk_weights: torch.Tensor,
                       out: torch.Tensor) -> torch.Tensor:
        """Per held expert, its rows in one matmul pair; adds ``w_k * y`` in expert order."""
        assert w.dense is not None
        inter = w.dense.down.shape[-1]
        for e in torch.unique(local[local >= 0]).tolist():
            tok, slot = (local == e).nonzero(as_tuple=True)
            gate, up = F.linear(u[tok], w.dense.gate_up[e]).split(inter, dim=-1)
            y = F.linear(F.silu(gate) * up, w.dense.down[e])
            out.index_add_(0, tok, topk_weights[tok, slot].to(out.dtype).unsqueeze(-1) * y)
        return out

    @staticmethod
    def _experts_fp8(w: MoEShardWeights, u: torch.Tensor, local: torch.Tensor,
                     topk_weights: torch.Tensor) -> torch.Tensor:
        """FP8 grouped GEMMs over expert-major rows. Pairs whose expert another rank
        holds go to local expert 0 with weight 0: no host sync, fixed shapes."""
        assert w.fp8 is not None
        owned = local >= 0
        ids = torch.where(owned, local, torch.zeros_like(local)).to(torch.int32)
        weights = torch.where(owned, topk_weights.float(), torch.zeros_like(topk_weights, dtype=torch.float32))
        rows = u.to(torch.bfloat16)
        permuted = moe.permute(rows, ids, w.fp8.num_experts, quant="none", check_ids=False)
        y = fp8x.routed_experts(permuted.x, permuted.expert_offsets, w.fp8)
        return moe.unpermute(y.to(torch.bfloat16), permuted, weights).float()


__all__ = ["FFNShard", "ShardSpec", "SwiGLUWeights", "MoEShardWeights", "default_expert_owner",
           "ffn_tensor_names", "MODES"]
