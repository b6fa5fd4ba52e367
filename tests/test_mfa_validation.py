"""afdkit.mfa argument checks: every refusal names the argument and the mismatch."""

import pytest
import torch

from afdkit import mfa


def _args(batch=2, q_len=1, heads=64, kv_heads=1, pages=8, page=64, max_pages=4, kv=torch.float8_e4m3fn):
    q = torch.randn(batch, q_len, heads, 256).to(torch.bfloat16)
    k = torch.randn(pages, page, kv_heads, 256).to(kv)
    v = torch.randn(pages, page, kv_heads, 256).to(kv)
    table = torch.randperm(pages)[: batch * max_pages].view(batch, max_pages).to(torch.int32)
    lens = torch.tensor([100, 7][:batch], dtype=torch.int32)
    scale = None if kv == torch.bfloat16 else torch.tensor([0.5])
    return dict(q=q, k_cache=k, v_cache=v, block_table=table, seq_lens=lens, k_scale=scale, v_scale=scale)


def test_valid_arguments_pass():
    shape = mfa.validate_decode(**_args())
    assert (shape.batch, shape.q_len, shape.num_q_heads, shape.num_kv_heads, shape.page_size) == (2, 1, 64, 1, 64)
    assert not shape.per_token_scale
    a = _args(kv=torch.float8_e4m3fn)
    a["k_scale"] = a["v_scale"] = torch.rand(8, 64, 1)
    assert mfa.validate_decode(**a).per_token_scale
    assert mfa.validate_decode(**_args(kv=torch.bfloat16)).kv_dtype == torch.bfloat16


@pytest.mark.parametrize(
    "mutate, exc, pattern",
    [
        (lambda a: a.update(q=a["q"].float()), TypeError, r"argument 'q' must have dtype one of \(bfloat16\), got float32"),
        (lambda a: a.update(q=a["q"][..., :128]), ValueError, r"argument 'q' must have size 256 in dimension 3 \(head_dim\)"),
        (lambda a: a.update(q=a["q"].repeat(1, 5, 1, 1)), ValueError, r"q_len \(q.shape\[1\]\) must be in 1..4, got 5"),
        (lambda a: a.update(q=a["q"][:, :, :40]), ValueError, r"num_q_heads \(40\) must be a multiple of 16 x num_kv_heads"),
        (lambda a: a.update(k_cache=a["k_cache"].to(torch.float16)), TypeError, r"argument 'k_cache' must have dtype one of"),
        (lambda a: a.update(k_cache=a["k_cache"].transpose(0, 1)), ValueError, r"argument 'k_cache' must be contiguous"),
        (lambda a: a.update(v_cache=a["v_cache"].to(torch.bfloat16)), ValueError, r"'k_cache' and 'v_cache' must match"),
        (lambda a: a.update(block_table=a["block_table"].long()), TypeError, r"argument 'block_table' must have dtype one of \(int32\), got int64"),
        (lambda a: a.update(seq_lens=a["seq_lens"][:1]), ValueError, r"argument 'seq_lens' must have size 2 in dimension 0 \(batch\)"),
        (lambda a: a.update(seq_lens=torch.tensor([257, 3], dtype=torch.int32)), ValueError, r"seq_lens\[0\] = 257 is over the block table's capacity \(4 pages x 64 = 256 tokens\)"),
        (lambda a: a["block_table"].__setitem__((1, 0), 8), ValueError, r"block_table\[1, 0\] = 8 is out of range for a cache of 8 pages"),
        (lambda a: a.update(k_scale=None), ValueError, r"argument 'k_scale' is required for a float8_e4m3fn cache"),
        (lambda a: a.update(k_scale=torch.rand(8, 64)), ValueError, r"argument 'k_scale' must be one value \(per-tensor\) or have shape \[8, 64, 1\]"),
        (lambda a: a.update(k_scale=torch.rand(8, 64, 1)), ValueError, r"'k_scale' and 'v_scale' must both be per-tensor or both per-token"),
        (lambda a: a.update(k_scale=torch.tensor([1.0], dtype=torch.float64)), TypeError, r"argument 'k_scale' must have dtype one of \(float32\)"),
    ],
)
def test_refusals_name_the_argument(mutate, exc, pattern):
    a = _args()
    mutate(a)
    with pytest.raises(exc, match=pattern):
        mfa.validate_decode(**a)


def test_unused_table_entries_are_not_checked():
    a = _args()
    a["block_table"][1, 1:] = -1  # seq 1 has 7 tokens: only its first page is read
    mfa.validate_decode(**a)


def test_page_size_must_be_supported():
    a = _args()
    a["k_cache"] = a["v_cache"] = torch.randn(8, 48, 1, 256).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"page_size \(k_cache.shape\[1\]\) must be one of \(16, 32, 64\), got 48"):
        mfa.validate_decode(**a)


def test_out_must_match_q():
    a = _args()
    with pytest.raises(ValueError, match=r"argument 'out' must have q's shape"):
        mfa.validate_decode(**a, out=torch.empty(2, 1, 64, 128, dtype=torch.bfloat16))
