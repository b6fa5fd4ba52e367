"""Step-3 text decoder: configuration and (seeded or loaded) weights.

``Step3Config.full()`` holds the real dimensions of StepFun's Step-3 (the defaults of the
public ``Step3TextConfig`` and the model card; see ``docs/step3.md`` for sources).
``Step3Config.tiny()`` shrinks every width but keeps the structure: MFA attention with a
low-rank query, one K/V head of dim 256 shared by a multiple of 16 query heads, leading
and trailing dense layers around MoE layers, a shared expert and an un-renormalised
softmax top-k router.

``Step3Weights`` is a flat ``{name: tensor}`` map that uses the checkpoint's own tensor
names (``model.layers.{i}.self_attn.q_proj.weight`` ...), so that a safetensors file of
the real model loads into it without renaming. Linear weights are ``[out, in]`` like
``torch.nn.Linear``; routed experts are stacked ``[num_experts, out, in]`` as in the
checkpoint.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import torch

_FULL_MOE_LAYERS = tuple(range(4, 60))


@dataclass(frozen=True)
class Step3Config:
    """Dimensions of a Step-3 text decoder (field names follow ``Step3TextConfig``)."""

    hidden_size: int = 7168
    intermediate_size: int = 18432          # dense SwiGLU width
    num_attention_heads: int = 64           # query heads
    num_attention_groups: int = 1           # K/V heads (MFA: one)
    num_hidden_layers: int = 61
    vocab_size: int = 128815
    rms_norm_eps: float = 1e-5
    moe_intermediate_size: int = 5120       # routed expert SwiGLU width
    moe_num_experts: int = 48
    moe_top_k: int = 3
    rope_theta: float = 500000.0
    max_position_embedding: int = 65536
    share_expert_dim: int = 5120            # shared expert SwiGLU width
    share_q_dim: int = 2048                 # low-rank query latent
    head_dim: int = 256
    norm_expert_weight: bool = False        # top-k weights are NOT renormalised
    moe_layers_enum: tuple[int, ...] = field(default=_FULL_MOE_LAYERS)
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"Step3Config: {msg}")

        need(self.num_attention_groups >= 1, "num_attention_groups must be >= 1")
        need(self.num_attention_heads % self.num_attention_groups == 0,
             f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
             f"num_attention_groups ({self.num_attention_groups})")
        need(self.head_dim % 2 == 0, f"head_dim must be even for rotate-half RoPE, got {self.head_dim}")
        need(1 <= self.moe_top_k <= self.moe_num_experts,
             f"moe_top_k must be in 1..{self.moe_num_experts}, got {self.moe_top_k}")
        need(all(0 <= i < self.num_hidden_layers for i in self.moe_layers_enum),
             f"moe_layers_enum must name layers in [0, {self.num_hidden_layers})")
        need(len(set(self.moe_layers_enum)) == len(self.moe_layers_enum), "moe_layers_enum has duplicates")

    # ------------------------------------------------------------------ presets
    @classmethod
    def full(cls) -> "Step3Config":
        """The real Step-3 text decoder (316B parameters, 38B activated per token)."""
        return cls()

    @classmethod
    def tiny(cls) -> "Step3Config":
        """A CPU-sized Step-3: same structure, widths cut so a decode step takes milliseconds.

        Kept: head_dim 256 (the MFA kernel's only head size), one K/V head, 16 query heads
        (the smallest group the kernel tiles), hidden a multiple of 128 (FP8 per-128-channel
        scales), top-3 softmax routing without renormalisation, a shared expert, dense
        layers before and after the MoE layers, RoPE theta and RMSNorm eps.
        """
        return cls(
            hidden_size=256,
            intermediate_size=512,
            num_attention_heads=16,
            num_attention_groups=1,
            num_hidden_layers=6,
            vocab_size=1000,
            moe_intermediate_size=128,
            moe_num_experts=8,
            moe_top_k=3,
            max_position_embedding=4096,
            share_expert_dim=128,
            share_q_dim=128,
            head_dim=256,
            moe_layers_enum=(1, 2, 3, 4),
        )

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> "Step3Config":
        """Builds a config from a Hugging Face ``config.json`` dict (``text_config`` or top level).

        ``moe_layers_enum`` may be the checkpoint's comma-separated string. Unknown keys
        are ignored; missing keys take the Step-3 defaults.
        """
        d = dict(d.get("text_config", d))
        if isinstance(d.get("moe_layers_enum"), str):
            d["moe_layers_enum"] = tuple(int(s) for s in d["moe_layers_enum"].split(",") if s.strip())
        elif d.get("moe_layers_enum") is not None:
            d["moe_layers_enum"] = tuple(int(i) for i in d["moe_layers_enum"])
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in names and v is not None})

    # ------------------------------------------------------------------ layers
    @property
    def num_kv_heads(self) -> int:
        return self.num_attention_groups

    @property
    def q_heads_per_kv(self) -> int:
        return self.num_attention_heads // self.num_attention_groups

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.moe_layers_enum))

    @property
    def dense_layers(self) -> tuple[int, ...]:
        moe = set(self.moe_layers_enum)
        return tuple(i for i in range(self.num_hidden_layers) if i not in moe)

    def is_moe_layer(self, layer: int) -> bool:
        if not 0 <= layer < self.num_hidden_layers:
            raise IndexError(f"layer {layer} out of range [0, {self.num_hidden_layers})")
        return layer in self.moe_layers_enum

    # ------------------------------------------------------------------ attention
    @property
    def q_size(self) -> int:
        """Width of all query heads together (the input of ``o_proj``)."""
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_attention_groups * self.head_dim

    @property
    def qkv_a_size(self) -> int:
        """Output width of the first attention projection: query latent + K + V."""
        return self.share_q_dim + 2 * self.kv_size

    @property
    def softmax_scale(self) -> float:
        return self.head_dim ** -0.5

    @property
    def kv_values_per_token_per_layer(self) -> int:
        return 2 * self.kv_size

    @property
    def kv_bytes_per_token_per_layer(self) -> int:
        """Bytes of K + V per cached token per layer in FP8 (Step-3: 512)."""
        return self.kv_values_per_token_per_layer

    @property
    def attention_flops_per_cached_token(self) -> int:
        """FLOP per cached token per layer per decoded token: QK^T and PV, 2 FLOP a MAC."""
        return 2 * 2 * self.num_attention_heads * self.head_dim

    # ------------------------------------------------------------------ sizes
    def num_parameters(self, activated: bool = False) -> int:
        """All parameters, or those one token touches (``activated``: top-k experts only)."""
        h = self.hidden_size
        attn = h * self.qkv_a_size + self.share_q_dim + self.share_q_dim * self.q_size + self.q_size * h
        norms = 2 * h
        dense = 3 * h * self.intermediate_size
        experts = self.moe_top_k if activated else self.moe_num_experts
        moe = experts * 3 * h * self.moe_intermediate_size + 3 * h * self.share_expert_dim + h * self.moe_num_experts
        n_moe = len(self.moe_layers_enum)
        n_dense = self.num_hidden_layers - n_moe
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * (attn + norms) + n_dense * dense + n_moe * moe + emb + h


def _layer_shapes(config: Step3Config, i: int) -> dict[str, tuple[int, ...]]:
    c, h = config, config.hidden_size
    p = f"model.layers.{i}."
    shapes: dict[str, tuple[int, ...]] = {
        p + "input_layernorm.weight": (h,),
        p + "self_attn.q_proj.weight": (c.share_q_dim, h),
        p + "self_attn.k_proj.weight": (c.kv_size, h),
        p + "self_attn.v_proj.weight": (c.kv_size, h),
        p + "self_attn.inter_norm.weight": (c.share_q_dim,),
        p + "self_attn.wq.weight": (c.q_size, c.share_q_dim),
        p + "self_attn.o_proj.weight": (h, c.q_size),
        p + "post_attention_layernorm.weight": (h,),
    }
    if c.is_moe_layer(i):
        e, m, s = c.moe_num_experts, c.moe_intermediate_size, c.share_expert_dim
        shapes.update({
            p + "moe.gate.weight": (e, h),
            p + "moe.gate_proj.weight": (e, m, h),
            p + "moe.up_proj.weight": (e, m, h),
            p + "moe.down_proj.weight": (e, h, m),
            p + "share_expert.gate_proj.weight": (s, h),
            p + "share_expert.up_proj.weight": (s, h),
            p + "share_expert.down_proj.weight": (h, s),
        })
    else:
        f = c.intermediate_size
        shapes.update({
            p + "mlp.gate_proj.weight": (f, h),
            p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f),
        })
    return shapes


def weight_shapes(config: Step3Config) -> dict[str, tuple[int, ...]]:
    """Every tensor of the model by checkpoint name, in a fixed order."""
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, config.hidden_size)}
    for i in range(config.num_hidden_layers):
        shapes.update(_layer_shapes(config, i))
    shapes["model.norm.weight"] = (config.hidden_size,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, config.hidden_size)
    return shapes


def _random_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """One tensor from its own generator (seeded by the model seed and the tensor name).

    Seeding per name keeps every tensor independent of the order and of the other
    tensors, so changing one part of a config leaves the others' weights unchanged.
    """
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (1 << 63))
    if name.endswith("norm.weight"):
        # Near 1 but not 1: a reference that forgets to apply a norm weight is caught.
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if name == "model.embed_tokens.weight":
        return torch.randn(shape, generator=gen)
    fan_in = shape[-1]
    return torch.randn(shape, generator=gen) / math.sqrt(fan_in)


@dataclass
class Step3Weights:
    """The model's tensors by checkpoint name, with helpers to read one layer's parts."""

    config: Step3Config
    tensors: dict[str, torch.Tensor]

    @classmethod
    def random(cls, config: Step3Config, seed: int = 0, dtype: torch.dtype = torch.float32) -> "Step3Weights":
        """Deterministic random weights: linear ~ N(0, 1/fan_in), norms ~ 1 + N(0, 0.01),
        embeddings ~ N(0, 1). Uses only local generators (no global RNG state)."""
        tensors = {name: _random_tensor(name, shape, seed).to(dtype)
                   for name, shape in weight_shapes(config).items()}
        return cls(config, tensors)

    @classmethod
    def from_state_dict(cls, config: Step3Config, state: Mapping[str, torch.Tensor],
                        strict: bool = True) -> "Step3Weights":
        """Wraps loaded tensors (e.g. from safetensors), checking names and shapes.

        Keys may carry the multimodal checkpoint's ``language_model.`` prefix.
        """
        state = {k.removeprefix("language_model."): v for k, v in state.items()}
        expected = weight_shapes(config)
        missing = [k for k in expected if k not in state]
        if strict and missing:
            raise KeyError(f"Step3Weights: {len(missing)} tensors missing, e.g. {missing[:3]}")
        for name, shape in expected.items():
            if name in state and tuple(state[name].shape) != shape:
                raise ValueError(f"Step3Weights: {name} has shape {list(state[name].shape)}, expected {list(shape)}")
        return cls(config, {k: state[k] for k in expected if k in state})

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def layer(self, i: int, part: str) -> torch.Tensor:
        """``layer(3, "self_attn.wq")`` -> tensor ``model.layers.3.self_attn.wq.weight``."""
        return self.tensors[f"model.layers.{i}.{part}.weight"]

    @property
    def lm_head(self) -> torch.Tensor:
        key = "model.embed_tokens.weight" if self.config.tie_word_embeddings else "lm_head.weight"
        return self.tensors[key]

    def to(self, *args: Any, **kwargs: Any) -> "Step3Weights":
        """A copy with every tensor moved/cast like ``Tensor.to``."""
        return Step3Weights(self.config, {k: v.to(*args, **kwargs) for k, v in self.tensors.items()})

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors.values())


__all__ = ["Step3Config", "Step3Weights", "weight_shapes"]
