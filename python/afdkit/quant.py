"""FP8 e4m3 quantization: ``quantize_fp8`` on CUDA (native kernel) or CPU (reference).

Convention (bit-identical on both paths): ``scale = max(amax, 1e-12) / 448`` over the
group in fp32, ``q = e4m3(x / scale)`` rounded to nearest even and saturated, so that
``x ~= q.float() * scale``. Scale shapes follow the granularity:

================  =====================================
``"tensor"``      ``[]`` (one value)
``"token"``       ``[*x.shape[:-1], 1]``
``"channel128"``  ``[*x.shape[:-1], x.shape[-1] // 128]``
================  =====================================
"""

from __future__ import annotations

from typing import Literal

import torch

from afdkit._dlpack import capsule, stream_of
from afdkit._native import native

Granularity = Literal["tensor", "token", "channel128"]
_GRANULARITIES = ("tensor", "token", "channel128")
_INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _scale_shape(x_shape: torch.Size, granularity: str) -> tuple[int, ...]:
    if granularity == "tensor":
        return ()
    if granularity == "token":
        return (*x_shape[:-1], 1)
    return (*x_shape[:-1], x_shape[-1] // 128)


def _validate(x: torch.Tensor, granularity: str, scale: torch.Tensor | None) -> None:
    op = "afdkit.quantize_fp8"
    if granularity not in _GRANULARITIES:
        raise ValueError(f"{op}: granularity must be one of {_GRANULARITIES}, got {granularity!r}")
    if x.dtype not in _INPUT_DTYPES:
        raise TypeError(f"{op}: argument 'x' must have dtype bfloat16, float16 or float32, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{op}: argument 'x' must have at least 1 dimension, got a scalar")
    if granularity == "channel128" and x.shape[-1] % 128 != 0:
        raise ValueError(
            f"{op}: per-128-channel scales need x.shape[-1] % 128 == 0, got {x.shape[-1]}"
        )
    if scale is not None:
        if granularity != "tensor":
            raise ValueError(f"{op}: a given scale is only supported for granularity 'tensor'")
        if scale.dtype != torch.float32 or scale.numel() != 1:
            raise ValueError(
                f"{op}: argument 'scale' must be one float32 value, got {scale.dtype}{list(scale.shape)}"
            )
        if scale.device != x.device:
            raise ValueError(f"{op}: 'scale' is on {scale.device} but 'x' is on {x.device}")


@torch.library.custom_op("afdkit::quantize_fp8", mutates_args=())
def _quantize_fp8(
    x: torch.Tensor, granularity: str, scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    if x.device.type != "cuda":
        from afdkit import reference

        if scale is not None:
            return reference.quantize_fp8_with_scale(x, scale), scale.reshape(()).clone()
        return reference.quantize_fp8(x, granularity)
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    q = torch.empty(x2.shape, dtype=torch.float8_e4m3fn, device=x.device)
    scale_shape = _scale_shape(x2.shape, granularity)
    if granularity == "tensor":
        s = scale.reshape(1).clone() if scale is not None else torch.empty(1, dtype=torch.float32, device=x.device)
        workspace = None if scale is not None else torch.empty(1, dtype=torch.float32, device=x.device)
    else:
        s = torch.empty((x2.shape[0],) if granularity == "token" else scale_shape, dtype=torch.float32, device=x.device)
        workspace = None
    native().quantize_fp8(
        capsule(x2), capsule(q), capsule(s), granularity,
        static_scale=scale is not None,
        workspace=None if workspace is None else capsule(workspace),
        stream=stream_of(x),
    )
    return q.reshape(x.shape), s.reshape(_scale_shape(x.shape, granularity))


@_quantize_fp8.register_fake
def _(x: torch.Tensor, granularity: str, scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    return q, torch.empty(_scale_shape(x.shape, granularity), dtype=torch.float32, device=x.device)


def quantize_fp8(
    x: torch.Tensor, granularity: Granularity = "tensor", scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantizes ``x`` to FP8 e4m3; returns ``(q, scale)`` with ``x ~= q.float() * scale``.

    ``scale`` (granularity ``"tensor"`` only) fixes the scale instead of measuring
    ``amax`` (the static KV-cache convention). CUDA inputs run the native kernel on the
    current stream; CPU inputs run :func:`afdkit.reference.quantize_fp8`.
    """
    _validate(x, granularity, scale)
    return _quantize_fp8(x, granularity, scale)


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, granularity: Granularity = "tensor") -> torch.Tensor:
    """``q.float() * scale`` broadcast by granularity (fp32 result)."""
    from afdkit import reference

    return reference.dequantize_fp8(q, scale, granularity)


__all__ = ["quantize_fp8", "dequantize_fp8", "Granularity"]
