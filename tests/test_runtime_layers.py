"""The runtime's Step-3 layers against the fp32 reference model, the safetensors
loader, and the FFN split (tensor- and expert-parallel) against the unsplit FFN.

Tolerances: the runtime rounds q and the attention output to bf16 and stores K/V in
FP8 after a bf16 rounding (the reference quantizes fp32 K/V), so one layer agrees with
the reference to a relative L2 error of 2e-2; FFN shards are exact in float64 except
for the bf16 rounding of each partial (3e-3); FP8 experts are within 6e-2 of exact.
"""

from __future__ import annotations

import pytest
import torch

from afdkit import reference
from afdkit.models.step3 import Step3Config, Step3Weights
from afdkit.reference_model import ffn_wire_in
from afdkit.runtime.checkpoint import (RandomSource, SafetensorsSource, WeightsSource, check_source, load_weights,
                                       save_safetensors)
from afdkit.runtime.ffn import FFNShard, ShardSpec, default_expert_owner
from afdkit.runtime.kv import KVState
from afdkit.runtime.layers import AttentionStack
from afdkit.runtime.numerics import Numerics, wire_decode, wire_encode
from afdkit.runtime.worker import AttentionWorker, LocalFFN, colocated_shards, first_tokens
from afdkit.testing import rel_l2

CPU = Numerics.for_device("cpu")


@pytest.fixture(scope="module")
def tiny() -> tuple[Step3Config, Step3Weights]:
    config = Step3Config.tiny()
    return config, Step3Weights.random(config, seed=3)


def _reference_attention(x, weights, layer, kv: KVState, mb) -> torch.Tensor:
    """The reference block on the runtime's own (already appended) cache: fp32 q."""
    c = weights.config
    xn = reference.rms_norm(x.float(), weights.layer(layer, "input_layernorm"), c.rms_norm_eps)
    q, _, _ = reference.mfa_project_qkv(xn.unsqueeze(1), weights, layer, mb.positions.unsqueeze(1))
    cache = kv.layers[layer]
    o = reference.mfa_decode_reference(q, cache.k, cache.v, mb.block_table, mb.seq_lens, k_scale=cache.k_scale,
                                       v_scale=cache.v_scale, softmax_scale=c.softmax_scale, dtype=torch.float64)
    return x.float() + o.float().flatten(-2)[:, 0] @ weights.layer(layer, "self_attn.o_proj").float().T


@pytest.mark.parametrize("layer", [0, 2])  # a dense and an MoE layer
def test_attention_half_matches_reference(tiny, layer, gen):
    config, weights = tiny
    stack = AttentionStack(config, WeightsSource(weights), CPU)
    kv = KVState(config, config.num_hidden_layers, [0, 1, 2, 3, 4], 40, CPU, 2)
    kv.fill_context(21, seed=5)
    for mb in kv.microbatches:
        kv.advance(mb)
        x = torch.randn(mb.size, config.hidden_size, generator=gen, dtype=torch.float64)
        h, u = stack.attention(layer, x, kv, mb)
        want = _reference_attention(x, weights, layer, kv, mb)
        assert rel_l2(h, want) < 2e-2
        u_ref = reference.rms_norm(want, weights.layer(layer, "post_attention_layernorm"), config.rms_norm_eps)
        assert rel_l2(u, u_ref) < 2e-2
        # The appended K of the new token is the reference's (through bf16 then FP8).
        _, k_ref, _ = reference.mfa_project_qkv(
            reference.rms_norm(x.float(), weights.layer(layer, "input_layernorm"), config.rms_norm_eps).unsqueeze(1),
            weights, layer, mb.positions.unsqueeze(1))
        slots = mb.slots
        cache = kv.layers[layer]
        got_k = cache.k.view(-1, 256)[slots].float() * cache.k_scale.view(-1)[slots].unsqueeze(-1)
        assert rel_l2(got_k, k_ref[:, 0, 0]) < 5e-2
    if config.is_moe_layer(layer):
        w, ids = stack.route(layer, u)
        w_ref, ids_ref = reference.moe_router(u.float(), weights, layer)
        assert torch.equal(ids.long(), ids_ref) and torch.allclose(w, w_ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("layer", [0, 3])
@pytest.mark.parametrize("mode,count", [("broadcast", 1), ("broadcast", 2), ("routed", 2), ("routed", 3)])
def test_ffn_shards_add_up_to_the_reference_ffn(tiny, layer, mode, count, gen):
    config, weights = tiny
    if mode == "broadcast" and config.intermediate_size % count:
        pytest.skip("width does not split")
    u = torch.randn(7, config.hidden_size, generator=gen)
    owner = default_expert_owner(config.moe_num_experts, count) if mode == "routed" else ()
    shards = colocated_shards(config, WeightsSource(weights), CPU, mode, count, owner)
    topk = None
    home = torch.arange(7) % count
    if config.is_moe_layer(layer):
        topk = reference.moe_router(u, weights, layer)
        topk = (topk[0], topk[1].to(torch.int32))
    got = LocalFFN(shards).begin(layer, 0, u.double(), topk, home).float()
    u_wire = ffn_wire_in(u, "afd")
    if config.is_moe_layer(layer):
        want = reference.moe_ffn(u_wire, weights, layer, topk_weights=topk[0], topk_ids=topk[1].long())
    else:
        want = reference.dense_ffn(u_wire, weights, layer)
    assert rel_l2(got, want) < 3e-3 * count
    # Poisoned rows: every row's result is its own (no cross-row leakage).
    got_rows = LocalFFN(shards).begin(layer, 0, u[:3].double(), None if topk is None else (topk[0][:3], topk[1][:3]),
                                      home[:3])
    assert torch.equal(got_rows, got[:3].to(torch.bfloat16))


def test_routed_rows_reach_only_their_owners(tiny, gen):
    """An FFN rank of an expert-parallel split contributes nothing to rows it neither
    owns an expert of nor is home of: its partial is zero there."""
    config, weights = tiny
    owner = default_expert_owner(config.moe_num_experts, 2)
    shard = FFNShard(config, WeightsSource(weights), ShardSpec("routed", 1, 2, owner), CPU)
    u = torch.randn(4, config.hidden_size, generator=gen, dtype=torch.float64)
    ids = torch.tensor([[0, 1, 2]] * 4, dtype=torch.int32)  # all on rank 0's experts
    w = torch.rand(4, 3, generator=gen)
    y = shard.forward(2, u, ids, w, torch.tensor([False, True, False, False]))
    assert torch.count_nonzero(y[[0, 2, 3]]) == 0 and torch.count_nonzero(y[1]) == config.hidden_size


def test_fp8_expert_path_matches_exact(tiny, gen):
    """The GPU code path (FP8 experts, permute/unpermute) through its CPU fallbacks."""
    config, weights = tiny
    fp8 = Numerics.for_device("cpu", fp8_experts=True)
    for mode, count in (("broadcast", 1), ("routed", 2)):
        owner = default_expert_owner(config.moe_num_experts, count) if mode == "routed" else ()
        u = torch.randn(9, config.hidden_size, generator=gen, dtype=torch.float64)
        w, ids = reference.moe_router(u.float(), weights, 1)
        for f in range(count):
            spec = ShardSpec(mode, f, count, owner)
            home = torch.arange(9) % count == f
            exact = FFNShard(config, WeightsSource(weights), spec, CPU).forward(1, u, ids.int(), w, home)
            approx = FFNShard(config, WeightsSource(weights), spec, fp8).forward(1, u, ids.int(), w, home)
            assert rel_l2(approx, exact) < 6e-2, (mode, f)


def test_wire_round_trip(gen):
    u = torch.randn(5, 256, generator=gen, dtype=torch.float64) * 3
    q, s = wire_encode(u)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (5, 2)
    assert torch.equal(wire_decode(q, s, torch.float32), ffn_wire_in(u.float(), "afd"))
    with pytest.raises(ValueError, match="multiple of 128"):
        wire_encode(torch.randn(2, 100))


def test_safetensors_round_trip(tiny, tmp_path, gen):
    config, weights = tiny
    paths = save_safetensors(weights, tmp_path / "ckpt", max_shard_bytes=1 << 20, prefix="language_model.")
    assert len(paths) > 2  # really sharded, with an index
    src = SafetensorsSource(tmp_path / "ckpt")
    assert src.names() == set(weights.tensors)
    for name, t in weights.tensors.items():
        assert torch.equal(src.tensor(name), t), name
    e = "model.layers.2.moe.gate_proj.weight"
    assert torch.equal(src.select(e, [5, 1, 6]), weights[e][[5, 1, 6]])
    assert torch.equal(src.select(e, [2, 3]), weights[e][2:4])
    assert torch.equal(src.narrow(e, 1, 32, 64), weights[e][:, 32:96])
    loaded = load_weights(config, tmp_path / "ckpt")
    assert all(torch.equal(loaded[n], weights[n]) for n in weights)
    # Decoding from the checkpoint gives exactly the tokens of the in-memory weights.
    runs = []
    for source in (src, WeightsSource(weights)):
        worker = AttentionWorker(config, source, CPU, [0, 1, 2], context=5, steps=3, num_microbatches=2, num_ffn=2)
        ffn = LocalFFN(colocated_shards(config, source, CPU, "routed", 2, default_expert_owner(8, 2)))
        runs.append(worker.run(ffn, keep_logits=True))
    assert torch.equal(runs[0].tokens, runs[1].tokens) and torch.equal(runs[0].logits, runs[1].logits)


def test_checkpoint_errors(tiny, tmp_path):
    config, weights = tiny
    partial = Step3Weights(config, {k: v for k, v in weights.tensors.items() if "layers.4.moe" not in k})
    save_safetensors(partial, tmp_path / "missing")
    with pytest.raises(KeyError, match="lacks"):
        check_source(config, SafetensorsSource(tmp_path / "missing"))
    bad = dict(weights.tensors)
    bad["model.norm.weight"] = torch.ones(7)
    save_safetensors(Step3Weights(config, bad), tmp_path / "shape")
    with pytest.raises(ValueError, match="model.norm.weight"):
        check_source(config, SafetensorsSource(tmp_path / "shape"))
    with pytest.raises(FileNotFoundError):
        SafetensorsSource(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no"):
        SafetensorsSource(tmp_path / "empty")


def test_random_source_equals_seeded_weights(tiny):
    config, weights = Step3Config.tiny(), Step3Weights.random(Step3Config.tiny(), seed=3)
    src = RandomSource(config, seed=3)
    for name in ("model.layers.1.moe.up_proj.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(src.tensor(name), weights[name])
    assert torch.equal(src.select("model.layers.1.moe.up_proj.weight", [3, 0]),
                       weights["model.layers.1.moe.up_proj.weight"][[3, 0]])


def test_decode_follows_the_reference_model(tiny):
    """End to end against the fp32 oracle (prefill of the first token = one decode
    step on an empty cache): the first step's logits agree closely; later steps too
    while the greedy tokens agree (FP8 rounding flips make exact token equality a
    matter of near-ties, so only clear wins are required to match)."""
    config, weights = tiny
    seqs = list(range(4))
    worker = AttentionWorker(config, WeightsSource(weights), CPU, seqs, context=0, steps=4, num_microbatches=2,
                             num_ffn=1, seed=1)
    res = worker.run(LocalFFN(colocated_shards(config, WeightsSource(weights), CPU, "broadcast", 1)), keep_logits=True)
    prompt = first_tokens(config, seqs, 1).unsqueeze(1)
    ref_tokens, ref_logits = reference.greedy_decode(config, weights, prompt, 4, ffn_wire="afd", return_logits=True)
    assert rel_l2(res.logits[:, 0], ref_logits[:, 0]) < 0.1
    top2 = ref_logits[:, 0].topk(2).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.05 * ref_logits[:, 0].std()
    assert torch.equal(res.tokens[clear, 0], ref_tokens[clear, 0])
    assert clear.sum() >= 2


def test_shard_spec_errors():
    with pytest.raises(ValueError, match="mode"):
        ShardSpec("tp", 0, 1)
    with pytest.raises(ValueError, match="outside"):
        ShardSpec("broadcast", 2, 2)
    with pytest.raises(ValueError, match="own none"):
        ShardSpec("routed", 0, 2, (0, 0, 0))
    with pytest.raises(ValueError, match="cannot share"):
        default_expert_owner(2, 3)


def test_unchecked_fast_path_gives_the_same_tokens(tiny):
    """check_indices=False (the CUDA default: no host syncs for range checks) takes the
    raw append op; on CPU it must decode exactly like the checked path."""
    config, weights = tiny
    out = []
    for checked in (True, False):
        nm = Numerics.for_device("cpu", check_indices=checked)
        src = WeightsSource(weights)
        w = AttentionWorker(config, src, nm, [0, 1, 2, 3], context=17, steps=3, num_microbatches=3, num_ffn=2)
        owner = default_expert_owner(config.moe_num_experts, 2)
        out.append(w.run(LocalFFN(colocated_shards(config, src, nm, "routed", 2, owner)), keep_logits=True))
    assert torch.equal(out[0].tokens, out[1].tokens) and torch.equal(out[0].logits, out[1].logits)
