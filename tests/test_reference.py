"""The kernel oracles of afdkit.reference: FP8 quantization, paged KV cache, MFA decode.

Tolerances: quantization is compared bit for bit against hand-derived e4m3 codes; FP8
round trips must stay within e4m3's half-ulp bound; the paged and dense attention
oracles compute the same fp64 math by different routes and must agree to 1e-12
(outputs) / 1e-6 (float32 lse).
"""

from __future__ import annotations

import math

import pytest
import torch

from afdkit import reference as ref

FP8 = torch.float8_e4m3fn
NAN_CODE = 0x7F  # e4m3fn NaN


def _codes(q: torch.Tensor) -> list[int]:
    return q.view(torch.uint8).flatten().tolist()


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits (NaN-safe equality)."""
    return t.view(torch.uint8 if t.element_size() == 1 else torch.int16)


def _wide_randn(shape, gen, spread: float = 3.0) -> torch.Tensor:
    """Random values over many binades (so e4m3 subnormals and normals both occur)."""
    return torch.randn(shape, generator=gen) * torch.exp(torch.randn(shape, generator=gen) * spread)


# ============================================================================ FP8


def test_quantize_convention_matches_hand_derived_codes():
    # amax 7 -> scale 7/448 = 2^-6 exactly, so x / scale is exact and only the e4m3 rounding acts.
    s = 2.0**-6
    x = torch.tensor([6.4 * s, -128 * s, 192 * s, 448 * s, 6.25 * s, 6.75 * s, 1.5 * 2**-9 * s, 0.0])
    q, scale = ref.quantize_fp8(x, "tensor")
    assert scale.shape == () and scale.dtype == torch.float32 and scale.item() == s
    # 6.4 -> 6.5 (0x4D); -128 (0xF0); 192 (0x74); 448 (0x7E); ties to even: 6.25 -> 6.0 (0x4C),
    # 6.75 -> 7.0 (0x4E); subnormal 1.5 * 2^-9 -> 2 * 2^-9 (0x02); 0 -> 0x00.
    assert _codes(q) == [0x4D, 0xF0, 0x74, 0x7E, 0x4C, 0x4E, 0x02, 0x00]


def test_token_and_channel128_scales_are_fp32_amax_over_448(gen):
    x = torch.randn(3, 256, generator=gen) * torch.tensor([[0.01], [1.0], [300.0]])
    _, s_tok = ref.quantize_fp8(x, "token")
    _, s_ch = ref.quantize_fp8(x, "channel128")
    assert s_tok.shape == (3, 1) and s_ch.shape == (3, 2)
    for r in range(3):
        assert s_tok[r, 0].item() == (x[r].abs().max() / torch.tensor(448.0)).item()
        for g in range(2):
            assert s_ch[r, g].item() == (x[r, 128 * g:128 * (g + 1)].abs().max() / torch.tensor(448.0)).item()


def test_all_zero_group_uses_the_amax_floor():
    q, s = ref.quantize_fp8(torch.zeros(2, 128), "token")
    assert torch.equal(s, torch.full((2, 1), 1e-12) / 448.0)
    assert _codes(q) == [0] * 256


def _assert_within_e4m3(x: torch.Tensor, back: torch.Tensor, scale_per_elem: torch.Tensor) -> None:
    # Normals: 3 mantissa bits, so rounding moves a value by at most half an ulp = 2^-4 |y|;
    # subnormals: fixed step 2^-9, half-step 2^-10. In x units both scale by `scale`.
    x64 = x.double()
    bound = torch.maximum(x64.abs() * 2.0**-4, scale_per_elem.double() * 2.0**-10) * (1 + 2.0**-20)
    err = (back.double() - x64).abs()
    assert torch.all(err <= bound), f"worst excess {(err - bound).max().item()}"


@pytest.mark.parametrize("granularity", ["tensor", "token", "channel128"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_error_bound(gen, granularity, dtype):
    x = _wide_randn((5, 7, 384), gen).to(dtype)
    q, s = ref.quantize_fp8(x, granularity)
    back = ref.dequantize_fp8(q, s, granularity)
    assert back.dtype == torch.float32 and back.shape == x.shape
    per_elem = s.repeat_interleave(128, dim=-1) if granularity == "channel128" else s.expand(x.shape)
    _assert_within_e4m3(x, back, per_elem)
    # The group maximum is representable exactly: 448 * scale round-trips to amax (fp32 ulps).
    amax = back.abs().amax() if granularity == "tensor" else back.abs().amax(-1)
    ref_amax = x.float().abs().amax() if granularity == "tensor" else x.float().abs().amax(-1)
    torch.testing.assert_close(amax, ref_amax, rtol=2e-7, atol=0)


def test_channel128_refuses_other_widths():
    with pytest.raises(ValueError, match=r"multiple of 128|% 128"):
        ref.quantize_fp8(torch.randn(4, 100), "channel128")
    with pytest.raises(ValueError, match="granularity"):
        ref.quantize_fp8(torch.randn(4, 128), "block")


def test_quantize_with_given_scale_saturates(gen):
    x = torch.randn(64, 32, generator=gen) * 4
    x[0, 0], x[0, 1] = 1e6, -1e6
    q = ref.quantize_fp8_with_scale(x, torch.tensor(0.02))
    assert _codes(q[0, :2]) == [0x7E, 0xFE]  # +-448
    expected = (x / torch.tensor(0.02)).clamp(-448, 448).to(FP8)
    assert _codes(q) == _codes(expected)
    inside = x.abs() <= 448 * 0.02  # beyond 448 * scale values saturate
    assert (~inside).sum() > 2
    _assert_within_e4m3(x[inside], q[inside].float() * 0.02, torch.full_like(x[inside], 0.02))
    assert (q[~inside].float().abs() == 448).all()
    q2 = ref.quantize_fp8_with_scale(x, 0.02)  # a Python float works the same
    assert _codes(q2) == _codes(q)


# ============================================================================ paged KV cache


def _poisoned_cache(num_pages, page_size, heads, dim, dtype):
    return torch.full((num_pages, page_size, heads, dim), float("nan")).to(dtype)


def test_slot_mapping_follows_the_block_table():
    table = torch.tensor([[5, 2, 7], [0, 3, 1]], dtype=torch.int32)
    pos = torch.tensor([[0, 15, 16, 33], [4, 20, -1, 40]])
    slots = ref.slot_mapping_for(table, pos, 16)
    expected = [[5 * 16 + 0, 5 * 16 + 15, 2 * 16 + 0, 7 * 16 + 1], [0 * 16 + 4, 3 * 16 + 4, -1, 1 * 16 + 8]]
    assert slots.tolist() == expected


@pytest.mark.parametrize("mode", ["tensor", "token", "bf16"])
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16])
def test_append_kv_round_trip_and_skipped_slots(gen, mode, in_dtype):
    num_pages, page_size, heads, dim, tokens = 6, 16, 2, 256, 40
    cache_dtype = torch.bfloat16 if mode == "bf16" else FP8
    k_cache, v_cache = (_poisoned_cache(num_pages, page_size, heads, dim, cache_dtype) for _ in range(2))
    if mode == "tensor":
        k_scale, v_scale = torch.tensor([0.03]), torch.tensor(0.05)
    elif mode == "token":
        k_scale, v_scale = (torch.full((num_pages, page_size, heads), float("nan")) for _ in range(2))
    else:
        k_scale = v_scale = None
    k = (torch.randn(tokens, heads, dim, generator=gen) * 2).to(in_dtype)
    v = (torch.randn(tokens, heads, dim, generator=gen) * 3).to(in_dtype)
    slots = torch.randperm(num_pages * page_size, generator=gen)[:tokens]
    slots[::7] = -1
    before_k = k_cache.clone()
    ref.append_kv_reference(k, v, k_cache, v_cache, slots.to(torch.int32), k_scale, v_scale)

    written = slots[slots >= 0]
    kept = slots >= 0
    for cache, scale, x in ((k_cache, k_scale, k), (v_cache, v_scale, v)):
        flat = cache.view(-1, heads, dim)[written]
        if mode == "bf16":
            assert torch.equal(flat, x[kept].to(torch.bfloat16))
            continue
        if mode == "tensor":
            s = scale.reshape(()).expand(flat.shape)
        else:
            s_rows = scale.view(-1, heads)[written]
            expected = torch.clamp(x[kept].float().abs().amax(-1), min=1e-12) / 448.0
            assert torch.equal(s_rows, expected)
            s = s_rows.unsqueeze(-1).expand(flat.shape)
        back = flat.float() * s
        _assert_within_e4m3(x[kept].float(), back, s)
    # Untouched rows (never written or skipped) keep their NaN poison bit for bit.
    untouched = torch.ones(num_pages * page_size, dtype=torch.bool)
    untouched[written] = False
    assert torch.equal(_bits(k_cache.view(-1, heads, dim)[untouched]), _bits(before_k.view(-1, heads, dim)[untouched]))
    if mode == "token":
        assert torch.isnan(k_scale.view(-1, heads)[untouched]).all()


def test_append_kv_refusals(gen):
    k = torch.randn(3, 1, 256, generator=gen)
    fp8 = _poisoned_cache(2, 16, 1, 256, FP8)
    bf16 = _poisoned_cache(2, 16, 1, 256, torch.bfloat16)
    slots = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="needs a scale"):
        ref.append_kv_reference(k, k, fp8, fp8.clone(), slots)
    with pytest.raises(ValueError, match="takes no scale"):
        ref.append_kv_reference(k, k, bf16, bf16.clone(), slots, torch.tensor(1.0), torch.tensor(1.0))
    with pytest.raises(ValueError, match="KV scale must have shape"):
        ref.append_kv_reference(k, k, fp8, fp8.clone(), slots, torch.ones(2, 16), torch.ones(2, 16))
    with pytest.raises(ValueError, match="beyond the cache"):
        ref.append_kv_reference(k, k, bf16, bf16.clone(), torch.tensor([0, 1, 32]))


# ============================================================================ attention


class PagedCase:
    """Random paged inputs: permuted tables, NaN everywhere nothing was written, and the
    dequantized K/V of each sequence computed independently of the cache (for the dense oracle)."""

    def __init__(self, gen, *, batch, q_len, hq, hkv, page_size, kv, scale_mode, seq_lens):
        dim = 256
        max_pages = max(-(-n // page_size) for n in seq_lens) + 1
        num_pages = sum(-(-n // page_size) for n in seq_lens) + 3  # spare pages stay NaN
        self.q = torch.randn(batch, q_len, hq, dim, generator=gen) * 1.5
        self.seq_lens = torch.tensor(seq_lens, dtype=torch.int32)
        perm = torch.randperm(num_pages, generator=gen).tolist()
        table = torch.full((batch, max_pages), 1 << 30, dtype=torch.int32)  # unused entries: out of range
        for b, n in enumerate(seq_lens):
            for p in range(-(-n // page_size)):
                table[b, p] = perm.pop()
        self.block_table = table
        cache_dtype = FP8 if kv == "fp8" else torch.bfloat16
        self.k_cache = _poisoned_cache(num_pages, page_size, hkv, dim, cache_dtype)
        self.v_cache = _poisoned_cache(num_pages, page_size, hkv, dim, cache_dtype)
        if kv != "fp8":
            self.k_scale = self.v_scale = None
        elif scale_mode == "tensor":
            self.k_scale, self.v_scale = torch.tensor([0.02]), torch.tensor([0.015])
        else:
            self.k_scale = torch.full((num_pages, page_size, hkv), float("nan"))
            self.v_scale = torch.full((num_pages, page_size, hkv), float("nan"))
        max_len = max(seq_lens + [1])
        self.k_dense = torch.full((batch, max_len, hkv, dim), float("nan"), dtype=torch.float64)
        self.v_dense = torch.full((batch, max_len, hkv, dim), float("nan"), dtype=torch.float64)
        for b, n in enumerate(seq_lens):
            k = torch.randn(n, hkv, dim, generator=gen) * 2
            v = torch.randn(n, hkv, dim, generator=gen) * 2 + 0.5
            pos = torch.arange(n).unsqueeze(0)
            slots = ref.slot_mapping_for(table[b:b + 1], pos, page_size)[0]
            ref.append_kv_reference(k, v, self.k_cache, self.v_cache, slots, self.k_scale, self.v_scale)
            self.k_dense[b, :n] = self._as_cached(k, kv, self.k_scale)
            self.v_dense[b, :n] = self._as_cached(v, kv, self.v_scale)

    @staticmethod
    def _as_cached(x, kv, scale):
        if kv != "fp8":
            return x.to(torch.bfloat16).double()
        if scale.numel() == 1:
            return ref.quantize_fp8_with_scale(x, scale).double() * scale.double()
        q, s = ref.quantize_fp8(x, "token")
        return q.double() * s.double()

    def paged(self, **kw):
        return ref.mfa_decode_reference(self.q, self.k_cache, self.v_cache, self.block_table, self.seq_lens,
                                        k_scale=self.k_scale, v_scale=self.v_scale, return_lse=True, **kw)


CASES = [
    # (hq, hkv, q_len, kv, scale_mode, page_size)
    (64, 1, 1, "fp8", "tensor", 16),
    (64, 1, 2, "fp8", "token", 64),
    (16, 1, 4, "bf16", None, 16),
    (32, 2, 3, "fp8", "token", 32),
    (32, 1, 1, "bf16", None, 32),
    (64, 2, 4, "fp8", "tensor", 16),
    (16, 2, 2, "bf16", None, 64),
]


@pytest.mark.parametrize("hq,hkv,q_len,kv,scale_mode,page_size", CASES)
def test_paged_equals_dense_on_gathered_pages(gen, hq, hkv, q_len, kv, scale_mode, page_size):
    seq_lens = [0, 1, 2, page_size, page_size + 1, 3 * page_size - 1, 150]
    case = PagedCase(gen, batch=len(seq_lens), q_len=q_len, hq=hq, hkv=hkv, page_size=page_size,
                     kv=kv, scale_mode=scale_mode, seq_lens=seq_lens)
    out, lse = case.paged()
    out_d, lse_d = ref.dense_attention_reference(case.q, case.k_dense, case.v_dense, case.seq_lens,
                                                 return_lse=True)
    assert out.dtype == case.q.dtype and lse.dtype == torch.float32 and lse.shape == (len(seq_lens), q_len, hq)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, out_d, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse, lse_d, rtol=1e-6, atol=1e-6)
    # seq_len 0: nothing visible for any query.
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isneginf(lse[0]).all()


def test_paged_matches_dense_to_fp64_precision(gen):
    case = PagedCase(gen, batch=3, q_len=3, hq=32, hkv=2, page_size=16, kv="fp8", scale_mode="token",
                     seq_lens=[5, 40, 77])
    q64 = case.q.double()
    out = ref.mfa_decode_reference(q64, case.k_cache, case.v_cache, case.block_table, case.seq_lens,
                                   k_scale=case.k_scale, v_scale=case.v_scale)
    out_d = ref.dense_attention_reference(q64, case.k_dense, case.v_dense, case.seq_lens)
    torch.testing.assert_close(out, out_d, rtol=1e-12, atol=1e-12)


def test_causal_rule_lse_and_output_by_brute_force(gen):
    """Element by element: query i of q_len sees the first seq_len - (q_len - 1 - i) tokens."""
    seq_lens, q_len, hq, hkv = [2, 6], 4, 16, 2
    case = PagedCase(gen, batch=2, q_len=q_len, hq=hq, hkv=hkv, page_size=16, kv="fp8",
                     scale_mode="token", seq_lens=seq_lens)
    out, lse = case.paged(softmax_scale=0.07)
    for b, n in enumerate(seq_lens):
        for i in range(q_len):
            visible = max(0, n - (q_len - 1 - i))
            assert visible == ref.visible_lengths(n, q_len)[i]
            for h in range(hq):
                if visible == 0:
                    assert lse[b, i, h].item() == float("-inf") and not out[b, i, h].any()
                    continue
                kvh = h // (hq // hkv)
                logits = [0.07 * float(case.q[b, i, h].double() @ case.k_dense[b, j, kvh]) for j in range(visible)]
                m = max(logits)
                z = sum(math.exp(t - m) for t in logits)
                assert lse[b, i, h].item() == pytest.approx(m + math.log(z), rel=1e-6, abs=1e-6)
                expect = sum(math.exp(t - m) / z * case.v_dense[b, j, kvh] for j, t in enumerate(logits))
                torch.testing.assert_close(out[b, i, h].double(), expect, rtol=1e-5, atol=1e-5)
    assert (lse[0, :2] == float("-inf")).all() and torch.isfinite(lse[0, 2:]).all()


def test_bf16_query_gives_bf16_output_close_to_fp64(gen):
    case = PagedCase(gen, batch=2, q_len=1, hq=64, hkv=1, page_size=16, kv="fp8", scale_mode="tensor",
                     seq_lens=[33, 100])
    q_bf16 = case.q.to(torch.bfloat16)
    out = ref.mfa_decode_reference(q_bf16, case.k_cache, case.v_cache, case.block_table, case.seq_lens,
                                   k_scale=case.k_scale, v_scale=case.v_scale)
    exact = ref.mfa_decode_reference(q_bf16.double(), case.k_cache, case.v_cache, case.block_table,
                                     case.seq_lens, k_scale=case.k_scale, v_scale=case.v_scale)
    assert out.dtype == torch.bfloat16
    rel = (out.double() - exact).norm() / exact.norm()
    assert rel < 1e-2  # the design's bf16-out tolerance (here only the final rounding)


def test_decode_refuses_mismatched_heads(gen):
    q = torch.randn(1, 1, 24, 256, generator=gen)
    cache = _poisoned_cache(2, 16, 16, 256, torch.bfloat16)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ref.mfa_decode_reference(q, cache, cache, torch.zeros(1, 2, dtype=torch.int32),
                                 torch.tensor([3], dtype=torch.int32))


def test_kv_scale_mode_classifies_by_shape():
    fp8 = _poisoned_cache(3, 16, 2, 256, FP8)
    assert ref.kv_scale_mode(torch.tensor(1.0), fp8) == "tensor"
    assert ref.kv_scale_mode(torch.tensor([1.0]), fp8) == "tensor"
    assert ref.kv_scale_mode(torch.ones(3, 16, 2), fp8) == "token"
    assert ref.kv_scale_mode(None, _poisoned_cache(3, 16, 2, 256, torch.bfloat16)) is None


def test_module_exports_resolve():
    from afdkit import reference_model

    for name in ref.__all__:
        assert getattr(ref, name) is not None
    assert set(reference_model.__all__) == set(ref._MODEL_EXPORTS)
    assert ref.greedy_decode is reference_model.greedy_decode
