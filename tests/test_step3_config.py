"""Step3Config (full/tiny) and Step3Weights: exact Step-3 numbers, tiny's invariants,
checkpoint names and shapes, deterministic seeded weights."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from afdkit.models.step3 import Step3Config, Step3Weights, weight_shapes


def test_full_has_the_real_step3_dimensions():
    c = Step3Config.full()
    assert (c.num_hidden_layers, c.hidden_size, c.vocab_size, c.rms_norm_eps) == (61, 7168, 128815, 1e-5)
    assert (c.num_attention_heads, c.num_kv_heads, c.head_dim, c.share_q_dim) == (64, 1, 256, 2048)
    assert c.rope_theta == 500000 and c.max_position_embedding == 65536
    assert c.intermediate_size == 18432
    assert (c.moe_num_experts, c.moe_top_k, c.moe_intermediate_size, c.share_expert_dim) == (48, 3, 5120, 5120)
    assert c.norm_expert_weight is False and c.tie_word_embeddings is False
    assert c.dense_layers == (0, 1, 2, 3, 60)
    assert c.moe_layers == tuple(range(4, 60)) and len(c.moe_layers) == 56
    assert [c.is_moe_layer(i) for i in (0, 3, 4, 59, 60)] == [False, False, True, True, False]
    assert c.qkv_a_size == 2048 + 256 + 256 and c.q_size == 64 * 256 == 16384
    assert c.softmax_scale == 1 / 16
    assert c.kv_bytes_per_token_per_layer == 512
    assert c.attention_flops_per_cached_token == 65536
    assert c.attention_flops_per_cached_token / c.kv_bytes_per_token_per_layer == 128  # FLOP/B


def test_full_parameter_counts_match_the_model_card():
    c = Step3Config.full()
    total, active = c.num_parameters(), c.num_parameters(activated=True)
    assert abs(total / 316e9 - 1) < 0.005          # "316B total (LLM)"
    assert abs(active / 38e9 - 1) < 0.03           # "38B activated per token"


def test_tiny_keeps_the_structure():
    t, f = Step3Config.tiny(), Step3Config.full()
    assert t.num_kv_heads == 1 and t.head_dim == f.head_dim == 256
    assert t.num_attention_heads % 16 == 0 and t.num_attention_heads >= 16
    assert t.hidden_size % 128 == 0 and t.share_q_dim % 128 == 0
    assert t.dense_layers[0] == 0 and t.dense_layers[-1] == t.num_hidden_layers - 1
    assert len(t.moe_layers) >= 2 and t.moe_layers == tuple(range(t.moe_layers[0], t.moe_layers[-1] + 1))
    assert 1 < t.moe_top_k < t.moe_num_experts and t.norm_expert_weight is False
    assert t.share_expert_dim > 0 and t.share_q_dim < t.q_size
    assert (t.rope_theta, t.rms_norm_eps) == (f.rope_theta, f.rms_norm_eps)
    assert t.num_parameters() < 20e6               # decodes in milliseconds on a CPU


def test_config_is_frozen_and_validated():
    c = Step3Config.tiny()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.hidden_size = 512  # type: ignore[misc]
    with pytest.raises(ValueError, match="multiple of num_attention_groups"):
        dataclasses.replace(c, num_attention_groups=3)
    with pytest.raises(ValueError, match="moe_layers_enum"):
        dataclasses.replace(c, moe_layers_enum=(1, 99))
    with pytest.raises(ValueError, match="moe_top_k"):
        dataclasses.replace(c, moe_top_k=c.moe_num_experts + 1)
    with pytest.raises(IndexError):
        c.is_moe_layer(c.num_hidden_layers)


def test_from_hf_dict_reads_the_checkpoint_style_config():
    f = Step3Config.full()
    d = {k: getattr(f, k) for k in f.__dataclass_fields__}
    d["moe_layers_enum"] = ",".join(str(i) for i in f.moe_layers_enum)
    d["some_unknown_key"] = 1
    assert Step3Config.from_hf_dict({"text_config": d, "vision_config": {}}) == f
    assert Step3Config.from_hf_dict({}) == f


def test_weights_use_checkpoint_names_and_shapes():
    c = Step3Config.tiny()
    w = Step3Weights.random(c, seed=0)
    assert set(w) == set(weight_shapes(c))
    for name, shape in weight_shapes(c).items():
        assert tuple(w[name].shape) == shape, name
    h, e, m = c.hidden_size, c.moe_num_experts, c.moe_intermediate_size
    moe, dense = c.moe_layers[0], c.dense_layers[0]
    assert w.layer(moe, "moe.gate_proj").shape == (e, m, h)
    assert w.layer(moe, "moe.down_proj").shape == (e, h, m)
    assert w.layer(moe, "moe.gate").shape == (e, h)
    assert w.layer(moe, "share_expert.up_proj").shape == (c.share_expert_dim, h)
    assert w.layer(dense, "mlp.down_proj").shape == (h, c.intermediate_size)
    assert w.layer(0, "self_attn.q_proj").shape == (c.share_q_dim, h)
    assert w.layer(0, "self_attn.wq").shape == (c.q_size, c.share_q_dim)
    assert w.layer(0, "self_attn.o_proj").shape == (h, c.q_size)
    assert f"model.layers.{moe}.mlp.gate_proj.weight" not in set(w)
    assert w.num_parameters() == c.num_parameters()
    full_names = weight_shapes(Step3Config.full())
    assert full_names["model.layers.4.moe.gate_proj.weight"] == (48, 5120, 7168)
    assert full_names["model.layers.0.self_attn.wq.weight"] == (16384, 2048)
    assert full_names["lm_head.weight"] == (128815, 7168)


def test_random_weights_are_deterministic_local_and_well_scaled():
    c = Step3Config.tiny()
    rng_before = torch.get_rng_state()
    a, b = Step3Weights.random(c, seed=7), Step3Weights.random(c, seed=7)
    other = Step3Weights.random(c, seed=8)
    assert torch.equal(torch.get_rng_state(), rng_before)  # no global RNG use
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(not torch.equal(a[k], other[k]) for k in a)
    for name in a:
        t = a[name]
        if name.endswith("norm.weight"):
            assert abs(t.mean().item() - 1) < 0.05 and 0.05 < t.std().item() < 0.15
        elif name != "model.embed_tokens.weight":
            assert abs(t.std().item() * math.sqrt(t.shape[-1]) - 1) < 0.1, name
    bf16 = Step3Weights.random(c, seed=7, dtype=torch.bfloat16)
    assert all(v.dtype == torch.bfloat16 for v in bf16.tensors.values())
    assert torch.equal(bf16["lm_head.weight"], a["lm_head.weight"].to(torch.bfloat16))


def test_each_tensor_is_seeded_by_its_name():
    """Changing one dimension leaves unrelated tensors unchanged (stable across configs)."""
    c = Step3Config.tiny()
    a = Step3Weights.random(c, seed=3)
    b = Step3Weights.random(dataclasses.replace(c, vocab_size=c.vocab_size + 1), seed=3)
    assert torch.equal(a.layer(2, "self_attn.wq"), b.layer(2, "self_attn.wq"))


def test_from_state_dict_accepts_the_multimodal_prefix_and_checks_shapes():
    c = Step3Config.tiny()
    w = Step3Weights.random(c, seed=1)
    loaded = Step3Weights.from_state_dict(c, {"language_model." + k: v for k, v in w.tensors.items()})
    assert set(loaded) == set(w)
    bad = dict(w.tensors)
    bad["model.norm.weight"] = torch.ones(3)
    with pytest.raises(ValueError, match="model.norm.weight"):
        Step3Weights.from_state_dict(c, bad)
    del bad["model.norm.weight"]
    with pytest.raises(KeyError, match="missing"):
        Step3Weights.from_state_dict(c, bad)
