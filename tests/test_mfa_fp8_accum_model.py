"""The CPU model behind v6's fp8 QK^T promotion (dev/mfa/fp8_accum_model.py)."""
import torch

from dev_module import load_dev_module

model = load_dev_module("dev/mfa/fp8_accum_model.py", "fp8_accum_model")


def test_truncate_mantissa_rounds_toward_zero_to_13_bits():
    x = torch.tensor([1 + 2**-13 + 2**-14, -(1 + 2**-13 + 2**-14), 3.0], dtype=torch.float64)
    assert model.truncate_mantissa(x).tolist() == [1 + 2**-13, -(1 + 2**-13), 3.0]


def test_one_step_is_exact_for_products_of_equal_exponent():
    a = torch.full((1, 32), 1.5, dtype=torch.float64)
    b = torch.full((1, 32), 2.0, dtype=torch.float64)
    assert model.wgmma_k32(a, b, None).item() == 96.0


def test_small_products_are_cut_below_the_largest():
    a = torch.zeros(1, 32, dtype=torch.float64)
    b = torch.ones(1, 32, dtype=torch.float64)
    a[0, 0], a[0, 1] = 448.0, 2.0**-8  # 2^-8 is 2^-16.8 of 448: below the 14 kept bits
    assert model.wgmma_k32(a, b, None).item() == 448.0


def _operands(seed: int):
    """Q rows as (x, hi, lo), K codes and the exact S, on the scale the kernel uses."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 256, generator=gen).bfloat16().double() * 64
    hi = model.e4m3(x)
    lo = model.e4m3(x - hi)
    k = model.e4m3(torch.randn(128, 256, generator=gen) * 100)
    return hi, lo, k, x @ k.T


def test_promotion_reduces_the_error_of_a_chain():
    hi, lo, k, exact = _operands(3)
    err = {g: (model.qk_fp8(hi, lo, k, g) - exact).abs().max().item() for g in (16, 2)}
    assert err[2] < err[16] / 2


def test_chaining_the_low_term_costs_little():
    """The kernel promotes only the high Q term: the low term's error is ~2^-4 smaller."""
    hi, lo, k, exact = _operands(5)
    both = (model.qk_fp8(hi, lo, k, 2) - exact).abs().max().item()
    hi_only = (model.qk_fp8_hi_promoted(hi, lo, k, 2) - exact).abs().max().item()
    chained = (model.qk_fp8(hi, lo, k, 16) - exact).abs().max().item()
    assert hi_only < 1.25 * both and hi_only < chained / 2
