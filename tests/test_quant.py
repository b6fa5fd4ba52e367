"""FP8 quantization: the op on CPU (reference path) and CUDA (native kernel, bit-exact)."""

import pytest
import torch

from afdkit import quant
from afdkit._dlpack import capsule

E4M3_MAX = 448.0


def _hand_quantize(x: torch.Tensor, group: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent spelling of the convention: amax per group, scale = amax/448, RNE cast."""
    xf = x.float()
    if group is None:
        amax = xf.abs().amax()
        scale = torch.clamp(amax, min=1e-12) / E4M3_MAX
        return (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale
    g = xf.reshape(*xf.shape[:-1], xf.shape[-1] // group, group)
    scale = torch.clamp(g.abs().amax(dim=-1, keepdim=True), min=1e-12) / E4M3_MAX
    q = (g / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.reshape(xf.shape), scale.squeeze(-1)


def _codes(q: torch.Tensor) -> torch.Tensor:
    return q.view(torch.uint8)


GROUPS = {"tensor": None, "token": "row", "channel128": 128}


def _expected(x, granularity):
    group = GROUPS[granularity]
    if group == "row":
        group = x.shape[-1]
    q, s = _hand_quantize(x, group)
    if granularity == "token":
        s = s.reshape(*x.shape[:-1], 1)
    return q, s


@pytest.mark.parametrize("granularity", ["tensor", "token", "channel128"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_path_follows_the_convention(gen, granularity, dtype):
    x = (torch.randn(3, 5, 256, generator=gen) * torch.rand(3, 5, 1, generator=gen) * 40).to(dtype)
    q, s = quant.quantize_fp8(x, granularity)
    q_exp, s_exp = _expected(x, granularity)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert s.shape == s_exp.shape and s.dtype == torch.float32
    assert torch.equal(s, s_exp)
    assert torch.equal(_codes(q), _codes(q_exp))


def test_round_trip_error_is_within_e4m3_precision(gen):
    x = torch.randn(64, 512, generator=gen, dtype=torch.float64) * 10
    q, s = quant.quantize_fp8(x.float(), "channel128")
    back = quant.dequantize_fp8(q, s, "channel128").double()
    scale = s.double().repeat_interleave(128, dim=-1)
    # 3 mantissa bits: half an ulp is 2^-4 relative for normals; subnormal steps are 2^-9 * scale.
    bound = torch.maximum(x.abs() * 2.0**-4, scale * 2.0**-10) * (1 + 1e-6)
    assert torch.all((back - x).abs() <= bound)


def test_static_tensor_scale_is_used_as_given(gen):
    x = torch.randn(16, 128, generator=gen)
    scale = torch.tensor([0.01])
    q, s = quant.quantize_fp8(x, "tensor", scale=scale)
    assert s.item() == pytest.approx(0.01)
    assert torch.equal(_codes(q), _codes((x / 0.01).clamp(-448, 448).to(torch.float8_e4m3fn)))


def test_validation_errors():
    x = torch.randn(4, 100)
    with pytest.raises(ValueError, match=r"x\.shape\[-1\] % 128 == 0, got 100"):
        quant.quantize_fp8(x, "channel128")
    with pytest.raises(ValueError, match="granularity must be one of"):
        quant.quantize_fp8(x, "block")
    with pytest.raises(TypeError, match="must have dtype bfloat16, float16 or float32, got torch.int32"):
        quant.quantize_fp8(x.to(torch.int32), "token")
    with pytest.raises(ValueError, match="only supported for granularity 'tensor'"):
        quant.quantize_fp8(x, "token", scale=torch.tensor([1.0]))
    with pytest.raises(ValueError, match="one float32 value"):
        quant.quantize_fp8(x, "tensor", scale=torch.tensor([1.0, 2.0]))


def test_custom_op_registration_passes_opcheck(gen):
    x = torch.randn(8, 256, generator=gen)
    for granularity in ("tensor", "token", "channel128"):
        torch.library.opcheck(torch.ops.afdkit.quantize_fp8.default, (x, granularity, None))


# ---------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("granularity", ["tensor", "token", "channel128"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 128), (7, 384), (300, 7168)])
def test_cuda_kernel_is_bit_exact(gen, granularity, dtype, shape):
    x = (torch.randn(shape, generator=gen) * torch.rand(shape[0], 1, generator=gen) * 50).to(dtype)
    q, s = quant.quantize_fp8(x.cuda(), granularity)
    q_exp, s_exp = _expected(x, granularity)
    torch.cuda.synchronize()
    assert torch.equal(s.cpu(), s_exp)
    assert torch.equal(_codes(q.cpu()), _codes(q_exp))


@pytest.mark.gpu
@pytest.mark.parametrize("granularity", ["tensor", "token", "channel128"])
def test_cuda_kernel_writes_every_output_of_a_strided_input(native, gen, granularity):
    base = torch.randn(33, 1024, generator=gen).to(torch.bfloat16).cuda()
    x = base[:, 256:768]  # row stride 1024, 512 columns
    q = torch.full(x.shape, 0x7F, dtype=torch.uint8, device="cuda").view(torch.float8_e4m3fn)  # NaN poison
    rows, cols = x.shape
    s_shape = {"tensor": (1,), "token": (rows,), "channel128": (rows, cols // 128)}[granularity]
    s = torch.full(s_shape, float("nan"), device="cuda")
    ws = torch.full((1,), float("nan"), device="cuda")
    native.quantize_fp8(capsule(x), capsule(q), capsule(s), granularity, workspace=capsule(ws),
                        stream=torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    q_exp, s_exp = _expected(x.cpu(), granularity)
    assert torch.equal(_codes(q.cpu()), _codes(q_exp))
    assert torch.equal(s.cpu().reshape(s_exp.shape), s_exp)


@pytest.mark.gpu
def test_cuda_static_scale_and_special_values(gen):
    x = torch.randn(4, 256, generator=gen)
    x[0, 0], x[1, 1], x[2, 2] = float("inf"), -1e9, float("nan")
    q, _ = quant.quantize_fp8(x.cuda(), "tensor", scale=torch.tensor([0.5], device="cuda"))
    expected = (x / 0.5).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(_codes(q.cpu()), _codes(expected))


@pytest.mark.gpu
def test_cuda_validation_names_the_argument(native, gen):
    x = torch.randn(4, 256, generator=gen).cuda()
    q = torch.empty(4, 256, dtype=torch.uint8, device="cuda")  # wrong dtype for out
    s = torch.empty(4, device="cuda")
    with pytest.raises(TypeError, match=r"argument 'out' must have dtype float8_e4m3fn, got uint8"):
        native.quantize_fp8(capsule(x), capsule(q), capsule(s), "token")
    with pytest.raises(ValueError, match=r"argument 'x' must be a CUDA tensor"):
        native.quantize_fp8(capsule(x.cpu()), capsule(q.view(torch.float8_e4m3fn)), capsule(s), "token")


@pytest.mark.gpu
def test_cuda_op_is_graph_capturable(gen):
    x = torch.randn(128, 7168, generator=gen).to(torch.bfloat16).cuda()
    quant.quantize_fp8(x, "channel128")  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q, s = quant.quantize_fp8(x, "channel128")
    x.copy_(torch.randn(128, 7168, generator=gen).to(torch.bfloat16))
    graph.replay()
    torch.cuda.synchronize()
    q_exp, s_exp = _expected(x.cpu(), "channel128")
    assert torch.equal(_codes(q.cpu()), _codes(q_exp)) and torch.equal(s.cpu(), s_exp)
