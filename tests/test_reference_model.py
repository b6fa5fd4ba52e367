"""Step-3 reference blocks and the colocated greedy decode (tiny model, CPU, fp32).

Tolerances: fp32 blocks against independent fp32/fp64 formulations within 1e-4
relative (accumulation order only); exact equality where the same numbers must come out
(determinism, skipped work).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from afdkit import reference as ref
from afdkit.models.step3 import Step3Config, Step3Weights


@pytest.fixture(scope="module")
def tiny() -> tuple[Step3Config, Step3Weights]:
    c = Step3Config.tiny()
    return c, Step3Weights.random(c, seed=0)


def _prompt(c: Step3Config, batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, c.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


# ============================================================================ elementwise


def test_rms_norm_matches_formula(gen):
    x, w = torch.randn(3, 5, 256, generator=gen) * 3, torch.rand(256, generator=gen) + 0.5
    x64 = x.double()
    expected = x64 / torch.sqrt((x64 * x64).mean(-1, keepdim=True) + 1e-5) * w.double()
    torch.testing.assert_close(ref.rms_norm(x, w, 1e-5).double(), expected, rtol=1e-6, atol=1e-6)


def test_rope_neox_rotates_pairs_j_and_j_plus_half(gen):
    d, theta, pos = 8, 500000.0, 37
    x = torch.randn(1, 2, d, generator=gen)
    out = ref.rope_neox(x, torch.tensor([pos]), theta)
    for h in range(2):
        for j in range(d // 2):
            a = pos * theta ** (-2 * j / d)
            x1, x2 = x[0, h, j].item(), x[0, h, j + d // 2].item()
            assert out[0, h, j].item() == pytest.approx(x1 * math.cos(a) - x2 * math.sin(a), abs=1e-5)
            assert out[0, h, j + d // 2].item() == pytest.approx(x2 * math.cos(a) + x1 * math.sin(a), abs=1e-5)


def test_rope_is_identity_at_zero_and_relative(gen):
    q, k = torch.randn(1, 4, 256, generator=gen), torch.randn(1, 4, 256, generator=gen)
    torch.testing.assert_close(ref.rope_neox(q, torch.tensor([0]), 5e5), q)
    def dot(m: int, n: int) -> torch.Tensor:
        return (ref.rope_neox(q, torch.tensor([m]), 5e5) * ref.rope_neox(k, torch.tensor([n]), 5e5)).sum(-1)
    torch.testing.assert_close(dot(7, 3), dot(1007, 1003), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(dot(7, 3), dot(7, 4), rtol=1e-3, atol=1e-3)


# ============================================================================ MoE


def test_router_topk_matches_sort_and_is_not_renormalised(gen):
    logits = torch.randn(64, 48, generator=gen) * 2
    w, ids = ref.router_topk(logits, 3)
    probs = torch.softmax(logits.double(), -1)
    top = probs.sort(-1, descending=True)
    assert ids.dtype == torch.int64 and w.dtype == torch.float32
    assert torch.equal(ids, top.indices[:, :3])
    torch.testing.assert_close(w.double(), top.values[:, :3], rtol=1e-6, atol=1e-7)
    assert (w.sum(-1) < 1).all()


def test_router_ties_pick_lower_ids_and_options(gen):
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.5, 3.0]])
    _, ids = ref.router_topk(logits, 2)
    assert ids.tolist() == [[1, 2]]
    x = torch.randn(16, 8, generator=gen)
    w, ids = ref.router_topk(x, 2, scoring="sigmoid", renormalize=True)
    s = torch.sigmoid(x.double()).gather(1, ids)
    torch.testing.assert_close(w.double(), s / s.sum(-1, keepdim=True), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="scoring"):
        ref.router_topk(x, 2, scoring="relu")


def _moe_dense_masked(u, w, layer):
    """Every expert on every token, then a [T, E] weight matrix zero outside the top-k."""
    c = w.config
    uf = u.double()
    probs = torch.softmax(uf @ w.layer(layer, "moe.gate").double().T, -1)
    kth = probs.sort(-1, descending=True).values[:, c.moe_top_k - 1 : c.moe_top_k]
    mask_w = torch.where(probs >= kth, probs, 0)                                  # [T, E]
    g = torch.einsum("th,eih->eti", uf, w.layer(layer, "moe.gate_proj").double())
    up = torch.einsum("th,eih->eti", uf, w.layer(layer, "moe.up_proj").double())
    y = torch.einsum("eti,ehi->eth", F.silu(g) * up, w.layer(layer, "moe.down_proj").double())
    routed = torch.einsum("te,eth->th", mask_w, y)
    sg, su, sd = (w.layer(layer, f"share_expert.{p}").double() for p in ("gate_proj", "up_proj", "down_proj"))
    return routed + (F.silu(uf @ sg.T) * (uf @ su.T)) @ sd.T


def test_moe_ffn_equals_all_experts_then_mask(tiny, gen):
    c, w = tiny
    layer = c.moe_layers[1]
    u = torch.randn(37, c.hidden_size, generator=gen)
    out = ref.moe_ffn(u, w, layer)
    assert out.dtype == torch.float32 and out.shape == u.shape
    torch.testing.assert_close(out.double(), _moe_dense_masked(u, w, layer), rtol=1e-4, atol=1e-5)
    # Given routing is used as is; the router's own routing gives the same numbers.
    tw, ti = ref.moe_router(u, w, layer)
    torch.testing.assert_close(ref.moe_ffn(u, w, layer, topk_weights=tw, topk_ids=ti), out, rtol=0, atol=0)
    # Not renormalised: scaling the weights scales the routed part only.
    doubled = ref.moe_ffn(u, w, layer, topk_weights=2 * tw, topk_ids=ti)
    shared_only = ref.moe_ffn(u, w, layer, topk_weights=0 * tw, topk_ids=ti)
    torch.testing.assert_close(doubled - shared_only, 2 * (out - shared_only), rtol=1e-4, atol=1e-5)


def test_dense_ffn_is_swiglu(tiny, gen):
    c, w = tiny
    u = torch.randn(5, c.hidden_size, generator=gen)
    g, up, d = (w.layer(0, f"mlp.{p}").double() for p in ("gate_proj", "up_proj", "down_proj"))
    expected = (F.silu(u.double() @ g.T) * (u.double() @ up.T)) @ d.T
    torch.testing.assert_close(ref.dense_ffn(u, w, 0).double(), expected, rtol=1e-4, atol=1e-5)


# ============================================================================ attention block


def _attention_from_scratch(x, w, layer):
    """Full causal self-attention over the whole sequence, no cache: [B, L, H] -> [B, L, H]."""
    c = w.config
    xn = ref.rms_norm(x, w.layer(layer, "input_layernorm"), c.rms_norm_eps)
    q_lat = xn @ w.layer(layer, "self_attn.q_proj").T
    k = (xn @ w.layer(layer, "self_attn.k_proj").T).unflatten(-1, (c.num_kv_heads, c.head_dim))
    v = (xn @ w.layer(layer, "self_attn.v_proj").T).unflatten(-1, (c.num_kv_heads, c.head_dim))
    q_lat = ref.rms_norm(q_lat, w.layer(layer, "self_attn.inter_norm"), c.rms_norm_eps)
    q = (q_lat @ w.layer(layer, "self_attn.wq").T).unflatten(-1, (c.num_attention_heads, c.head_dim))
    pos = torch.arange(x.shape[1]).expand(x.shape[0], -1)
    q, k = ref.rope_neox(q, pos, c.rope_theta), ref.rope_neox(k, pos, c.rope_theta)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=True, scale=1 / 16, enable_gqa=True)
    return o.transpose(1, 2).flatten(-2) @ w.layer(layer, "self_attn.o_proj").T


def test_attention_block_prefill_then_decode_matches_full_recompute(tiny, gen):
    c, w = tiny
    batch, prompt, page_size, layer = 2, 21, 16, 1
    x = torch.randn(batch, prompt + 1, c.hidden_size, generator=gen)
    cache = ref.allocate_kv_caches(c, 8, page_size, kv_dtype=torch.float32)[layer]
    table = torch.tensor([[5, 1, 6], [0, 7, 3]], dtype=torch.int32)
    full = _attention_from_scratch(x, w, layer)
    lens = torch.full((batch,), prompt, dtype=torch.int32)
    out = ref.step3_attention_block(x[:, :prompt], w, layer, cache, table, lens)
    torch.testing.assert_close(out, full[:, :prompt], rtol=1e-4, atol=1e-4)
    out = ref.step3_attention_block(x[:, prompt:], w, layer, cache, table, lens + 1)
    torch.testing.assert_close(out, full[:, prompt:], rtol=1e-4, atol=1e-4)
    # K was cached after RoPE: the cached row of token t equals rope(k_t, t).
    _, k, _ = ref.mfa_project_qkv(ref.rms_norm(x, w.layer(layer, "input_layernorm"), c.rms_norm_eps), w, layer,
                                  torch.arange(prompt + 1).expand(batch, -1))
    torch.testing.assert_close(cache.k[0, 3], k[1, 3], rtol=0, atol=0)  # seq 1, token 3 -> page 0 row 3


# ============================================================================ decode


def test_one_pass_prefill_equals_token_by_token(tiny):
    c, w = tiny
    prompt = _prompt(c, 2, 6)
    table = torch.tensor([[3, 0], [1, 2]], dtype=torch.int32)

    def run(chunks: list[int]) -> torch.Tensor:
        caches = ref.allocate_kv_caches(c, 4, 16, kv_dtype=torch.float32)
        start, logits = 0, []
        for n in chunks:
            lens = torch.full((2,), start + n, dtype=torch.int32)
            logits.append(ref.decode_step(w, caches, table, lens, prompt[:, start:start + n]))
            start += n
        return torch.cat(logits, dim=1)

    torch.testing.assert_close(run([6]), run([1] * 6), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(run([6]), run([2, 3, 1]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kv_dtype,kv_scale", [(torch.float8_e4m3fn, None), (torch.float8_e4m3fn, 0.05),
                                               (torch.bfloat16, None)])
def test_greedy_decode_is_deterministic(tiny, kv_dtype, kv_scale):
    c, w = tiny
    prompt = _prompt(c, 2, 5)
    a, logits = ref.greedy_decode(c, w, prompt, 4, kv_dtype=kv_dtype, kv_scale=kv_scale, return_logits=True)
    b = ref.greedy_decode(c, Step3Weights.random(c, seed=0), prompt, 4, kv_dtype=kv_dtype, kv_scale=kv_scale)
    assert a.shape == (2, 4) and a.dtype == torch.int64
    assert torch.equal(a, b)
    assert torch.equal(logits.argmax(-1), a) and torch.isfinite(logits).all()
    assert ((0 <= a) & (a < c.vocab_size)).all()


def test_greedy_decode_depends_on_the_seed_and_the_prompt(tiny):
    c, w = tiny
    prompt = _prompt(c, 2, 5)
    a = ref.greedy_decode(c, w, prompt, 4)
    assert not torch.equal(a, ref.greedy_decode(c, Step3Weights.random(c, seed=1), prompt, 4))
    assert not torch.equal(a, ref.greedy_decode(c, w, _prompt(c, 2, 5, seed=2), 4))


def test_first_token_is_the_argmax_of_a_plain_full_forward(tiny):
    """The decode's first token against a cache-free forward of the prompt (fp32 KV)."""
    c, w = tiny
    prompt = _prompt(c, 2, 7)
    x = w["model.embed_tokens.weight"][prompt]
    for i in range(c.num_hidden_layers):
        h = x + _attention_from_scratch(x, w, i)
        u = ref.rms_norm(h, w.layer(i, "post_attention_layernorm"), c.rms_norm_eps)
        x = h + (ref.moe_ffn(u, w, i) if c.is_moe_layer(i) else ref.dense_ffn(u, w, i))
    logits = ref.rms_norm(x[:, -1], w["model.norm.weight"], c.rms_norm_eps) @ w["lm_head.weight"].T
    tokens, dec_logits = ref.greedy_decode(c, w, prompt, 1, kv_dtype=torch.float32, return_logits=True)
    torch.testing.assert_close(dec_logits[:, 0], logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(tokens[:, 0], logits.argmax(-1))


def test_afd_wire_numerics_stay_close(tiny):
    c, w = tiny
    prompt = _prompt(c, 2, 5)
    _, exact = ref.greedy_decode(c, w, prompt, 1, kv_dtype=torch.float32, return_logits=True)
    _, wired = ref.greedy_decode(c, w, prompt, 1, kv_dtype=torch.float32, ffn_wire="afd", return_logits=True)
    rel = ((wired - exact).norm() / exact.norm()).item()
    assert 0 < rel < 0.1  # FP8 in / bf16 out around every FFN, routing unchanged
    with pytest.raises(ValueError, match="ffn_wire"):
        ref.greedy_decode(c, w, prompt, 1, ffn_wire="fp16")  # type: ignore[arg-type]


def test_greedy_decode_refuses_a_foreign_config(tiny):
    c, w = tiny
    with pytest.raises(ValueError, match="different config"):
        ref.greedy_decode(Step3Config.full(), w, _prompt(c, 1, 2), 1)
