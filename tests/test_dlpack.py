"""The DLPack boundary: dtype codes both ways (fp8 included) and argument refusals."""

import pytest
import torch

DTYPES = {
    torch.float32: ("float32", 2, 32),
    torch.float16: ("float16", 2, 16),
    torch.bfloat16: ("bfloat16", 4, 16),
    torch.float64: ("float64", 2, 64),
    torch.int32: ("int32", 0, 32),
    torch.int64: ("int64", 0, 64),
    torch.uint8: ("uint8", 1, 8),
    torch.int8: ("int8", 0, 8),
    torch.bool: ("bool", 6, 8),
    torch.float8_e4m3fn: ("float8_e4m3fn", 10, 8),  # DLPack 1.1 kDLFloat8_e4m3fn
    torch.float8_e5m2: ("float8_e5m2", 12, 8),  # DLPack 1.1 kDLFloat8_e5m2
}


class Exported:
    """A producer object around afdkit's export, so torch negotiates the capsule kind.

    Raw versioned capsules are not accepted by every torch's from_dlpack; the
    protocol way is __dlpack__(max_version=...), which picks versioned or legacy.
    """

    def __init__(self, native, src: torch.Tensor, want_versioned: bool):
        self.native, self.src, self.want_versioned, self.produced = native, src, want_versioned, None

    def __dlpack__(self, stream=None, max_version=None, dl_device=None, copy=None):
        versioned = self.want_versioned and max_version is not None and max_version[0] >= 1
        self.produced = "versioned" if versioned else "legacy"
        src = self.src.__dlpack__(stream=-1) if self.src.is_cuda else self.src.__dlpack__()
        return self.native._testing.reexport(src, versioned=versioned)

    def __dlpack_device__(self):
        return self.src.__dlpack_device__()


def _random(dtype: torch.dtype, shape, gen) -> torch.Tensor:
    x = torch.randn(shape, generator=gen) * 3
    if dtype == torch.bool:
        return x > 0
    if not dtype.is_floating_point:
        return x.to(torch.int64).to(dtype)
    return x.to(dtype)


@pytest.mark.parametrize("versioned", [True, False])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_torch_export_is_read_with_the_right_code(native, gen, dtype, versioned):
    x = _random(dtype, (5, 7), gen)
    cap = x.__dlpack__(max_version=(1, 1)) if versioned else torch.utils.dlpack.to_dlpack(x)
    d = native._testing.describe(cap)
    name, code, bits = DTYPES[dtype]
    assert (d["dtype"], d["dlpack_code"], d["dlpack_bits"]) == (name, code, bits)
    assert d["shape"] == [5, 7] and d["strides"] == [7, 1]
    assert d["device"] == "cpu" and d["data_ptr"] == x.data_ptr()


@pytest.mark.parametrize("versioned", [True, False])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_afdkit_export_is_consumed_by_torch(native, gen, dtype, versioned):
    x = _random(dtype, (4, 6), gen)[:, 1:5]  # a strided view: strides must survive
    producer = Exported(native, x, versioned)
    y = torch.from_dlpack(producer)
    assert producer.produced in ({"versioned", "legacy"} if versioned else {"legacy"})
    assert y.dtype == dtype and y.shape == x.shape and y.stride() == x.stride()
    assert y.data_ptr() == x.data_ptr()
    assert torch.equal(y.view(torch.uint8) if dtype.itemsize == 1 else y, x.view(torch.uint8) if dtype.itemsize == 1 else x)


def test_reexported_view_keeps_the_producer_alive(native, gen):
    x = torch.randn(1000, generator=gen)
    expected = x.clone()
    y = torch.from_dlpack(Exported(native, x, True))
    del x
    torch.randn(1000, generator=gen)  # reuse freed memory if the view dangled
    assert torch.equal(y, expected)


def test_byte_offset_and_noncontiguous_views(native, gen):
    x = torch.randn(8, 8, generator=gen)
    v = x[2:, 3:].t()
    d = native._testing.describe(v)
    assert d["shape"] == [5, 6] and d["strides"] == [1, 8]
    assert d["data_ptr"] == v.data_ptr()


def test_a_consumed_capsule_is_refused(native, gen):
    cap = torch.randn(3, generator=gen).__dlpack__(max_version=(1, 1))
    native._testing.describe(cap)
    with pytest.raises(TypeError, match="not an unconsumed DLPack tensor"):
        native._testing.describe(cap)


def test_non_tensors_are_refused_with_the_argument_name(native):
    with pytest.raises(TypeError, match=r"op: argument 'k_cache' must be a DLPack tensor or capsule, got list"):
        native._testing.check_arg([1, 2], "op", "k_cache")
    with pytest.raises(TypeError, match="got None"):
        native._testing.check_arg(None, "op", "k_cache")


def test_unsupported_element_types_are_refused(native):
    with pytest.raises(TypeError, match=r"argument 'x' has element type dlpack\(code=5"):
        native._testing.check_arg(torch.zeros(2, dtype=torch.complex64), "op", "x")


def test_wrong_dtype_names_expected_and_actual(native, gen):
    x = torch.randn(2, 3, generator=gen)
    with pytest.raises(TypeError, match=r"afdkit\.mfa\.decode: argument 'q' must have dtype bfloat16, got float32 \(float32\[2, 3\] on cpu\)"):
        native._testing.check_arg(x, "afdkit.mfa.decode", "q", dtype="bfloat16")


def test_wrong_shape_names_dimension_and_sizes(native, gen):
    x = torch.randn(2, 3, generator=gen)
    with pytest.raises(ValueError, match=r"argument 'q' must have size 256 in dimension 1, got 3"):
        native._testing.check_arg(x, "op", "q", shape=[2, 256])
    with pytest.raises(ValueError, match=r"argument 'q' must have 3 dimensions, got 2"):
        native._testing.check_arg(x, "op", "q", shape=[2, 3, 1])


def test_wrong_device_is_refused(native, gen):
    with pytest.raises(ValueError, match=r"argument 'k_cache' must be a CUDA tensor, got one on cpu"):
        native._testing.check_arg(torch.randn(2, generator=gen), "op", "k_cache", device="cuda")


def test_noncontiguous_is_refused_with_strides(native, gen):
    x = torch.randn(4, 6, generator=gen).t()
    with pytest.raises(ValueError, match=r"argument 'k_cache' must be contiguous, got strides \[1, 6\] for shape \[6, 4\]"):
        native._testing.check_arg(x, "op", "k_cache", contiguous=True)
    native._testing.check_arg(x.contiguous(), "op", "k_cache", contiguous=True)


@pytest.mark.gpu
def test_cuda_tensors_cross_with_device_and_code(native, gen):
    x = torch.randn(64, 256, generator=gen).to("cuda").to(torch.float8_e4m3fn)
    d = native._testing.describe(x.__dlpack__(stream=-1, max_version=(1, 1)))
    assert d["device"] == f"cuda:{x.device.index}" and d["dlpack_code"] == 10
    y = torch.from_dlpack(Exported(native, x, True))
    assert y.device == x.device and torch.equal(y.view(torch.uint8), x.view(torch.uint8))
