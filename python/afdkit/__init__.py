"""afdkit: Attention-FFN Disaggregation kit for Step-3-style MoE decoding.

The compiled core lives in ``afdkit._C`` (loaded lazily, so that the pure-Python
references in :mod:`afdkit.reference` import on any machine). Public parts:

- :mod:`afdkit.quant`      FP8 e4m3 quantization ops
- :mod:`afdkit.reference`  fp32/fp64 torch oracles for every kernel and the runtime
- :mod:`afdkit.models`     the Step-3 configuration and weights
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def build_info() -> dict[str, Any]:
    """What the native core was built with and what it finds at run time.

    Keys: version, git_sha, cuda_arch, nvcc_version, build_type, cxx_compiler,
    cuda_runtime_version, cuda_driver_version, cuda_device_count and ucx
    (build_version, runtime_version, transports).
    """
    from afdkit._native import native

    return dict(native().build_info())


__all__ = ["__version__", "build_info"]
