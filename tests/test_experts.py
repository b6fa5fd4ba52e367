"""Expert compute: FP8 weights, the per-expert loop, grouped GEMMs on CUDA, the MoE layer."""

import pytest
import torch

from afdkit import experts
from afdkit.testing import calc_diff


def _weights(e, inter, hidden, gen):
    s = hidden**-0.5
    gate = torch.randn(e, inter, hidden, generator=gen) * s
    up = torch.randn(e, inter, hidden, generator=gen) * s
    down = torch.randn(e, hidden, inter, generator=gen) * inter**-0.5
    return gate, up, down


def test_fp8_weights_round_trip(gen):
    gate, up, down = _weights(4, 256, 128, gen)
    w = experts.FP8ExpertWeights.from_dense(gate, up, down)
    gu, d = w.dequantized()
    assert calc_diff(gu, torch.cat([gate, up], 1)) < 1e-3 and calc_diff(d, down) < 1e-3


def test_loop_equals_dense_per_token_math(gen):
    e, inter, hidden = 3, 128, 128
    w = experts.FP8ExpertWeights.from_dense(*_weights(e, inter, hidden, gen))
    rows = torch.randn(10, hidden, generator=gen)
    offsets = torch.tensor([0, 4, 4, 10], dtype=torch.int32)  # expert 1 gets no rows
    out = experts.experts_loop(rows, offsets, w)
    gu, d = w.dequantized()
    owner = [0] * 4 + [2] * 6
    for r, ex in enumerate(owner):
        g, u = (rows[r] @ gu[ex].T).chunk(2)
        torch.testing.assert_close(out[r], (torch.nn.functional.silu(g) * u) @ d[ex].T, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [16, 128])
def test_cuda_grouped_matches_loop(gen, tokens):
    e, inter, hidden, k = 48, 512, 1024, 3
    w = experts.FP8ExpertWeights.from_dense(*_weights(e, inter, hidden, gen))
    w_gpu = experts.FP8ExpertWeights(*(t.cuda() for t in (w.gate_up, w.gate_up_scale, w.down, w.down_scale)))
    counts = torch.bincount(torch.randint(0, e, (tokens * k,), generator=gen), minlength=e)
    offsets = torch.zeros(e + 1, dtype=torch.int32)
    offsets[1:] = counts.cumsum(0)
    rows = torch.randn(tokens * k, hidden, generator=gen).to(torch.bfloat16)
    ref = experts.experts_loop(rows, offsets, w)
    got = experts.experts_grouped(rows.cuda(), offsets.cuda(), w_gpu).float().cpu()
    assert calc_diff(got, ref) < 2e-3  # FP8 activations and weights vs fp32 math on FP8 weights
