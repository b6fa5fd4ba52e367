"""How the runtime computes on a device: dtypes, page size, and the AFD wire format.

On CUDA the projections run in bf16 and the routed experts as FP8 grouped GEMMs. On
CPU everything between the quantization points runs in float64: a row's result then
does not depend on which other rows share its matrix multiply (BLAS picks different
blockings for different row counts), so an attention rank that holds a third of the
batch and the colocated model that holds all of it produce bit-identical tokens.

The quantization points are the same everywhere, and they are AFD's own:

- q goes into MFA decode as bf16, K/V are stored FP8 e4m3 with per-token scales;
- the post-attention hidden state ``u`` crosses to the FFN as FP8 e4m3 with one fp32
  scale per token per 128 channels (:func:`wire_encode` / :func:`wire_decode`);
- each FFN rank's partial result crosses back as bf16; the attention side adds the
  partials in fp32 and rounds the sum to bf16 once (what ``AfdChannel.recv`` does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from afdkit.quant import quantize_fp8

WIRE_GROUP = 128  # channels per FP8 scale on the A->F wire


@dataclass(frozen=True)
class Numerics:
    device: torch.device
    compute_dtype: torch.dtype   # projections, norms, FFN math
    page_size: int               # KV cache page size (16, 32 or 64: the MFA kernel's)
    fp8_experts: bool            # routed experts as FP8 grouped GEMMs (afdkit.experts)
    check_indices: bool = True   # host-side range checks in mfa ops (a device sync each)

    @classmethod
    def for_device(cls, device: str | torch.device, *, fp8_experts: bool | None = None,
                   check_indices: bool | None = None) -> "Numerics":
        dev = torch.device(device)
        if dev.type == "cuda":
            if dev.index is None:
                dev = torch.device("cuda", torch.cuda.current_device())
            return cls(dev, torch.bfloat16, 64, True if fp8_experts is None else fp8_experts,
                       False if check_indices is None else check_indices)
        if dev.type != "cpu":
            raise ValueError(f"afdkit.runtime: device must be 'cpu' or 'cuda[:N]', got {device!r}")
        return cls(dev, torch.float64, 16, False if fp8_experts is None else fp8_experts,
                   True if check_indices is None else check_indices)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def work_dtype(self) -> torch.dtype:
        """Where bf16 is the compute dtype, norms and RoPE still run in fp32."""
        return torch.float32 if self.compute_dtype in (torch.bfloat16, torch.float16) else self.compute_dtype


def wire_encode(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``u [T, H]`` -> (FP8 e4m3 ``[T, H]``, fp32 scales ``[T, H / 128]``)."""
    if u.shape[-1] % WIRE_GROUP:
        raise ValueError(f"afdkit.runtime: hidden size {u.shape[-1]} is not a multiple of {WIRE_GROUP} "
                         "(one FP8 scale per 128 channels on the wire)")
    if u.shape[0] == 0:  # an empty microbatch: nothing to quantize (no kernel launch)
        return (torch.empty(u.shape, dtype=torch.float8_e4m3fn, device=u.device),
                torch.empty(0, u.shape[1] // WIRE_GROUP, dtype=torch.float32, device=u.device))
    src = u if u.dtype in (torch.bfloat16, torch.float16, torch.float32) else u.float()
    return quantize_fp8(src.contiguous(), "channel128")


def wire_decode(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The FFN side's view of ``u``: ``q * scale`` in fp32, then ``dtype``."""
    rows = q.float().view(q.shape[0], q.shape[1] // WIRE_GROUP, WIRE_GROUP) * scale.float().unsqueeze(-1)
    return rows.view(q.shape).to(dtype)


def reduce_partials(parts: list[tuple[torch.Tensor | None, torch.Tensor]], rows: int,
                    hidden: int, device: torch.device) -> torch.Tensor:
    """Adds bf16 partial results of several FFN ranks as the AFD channel does: fp32
    accumulation in FFN-rank order, one rounding to bf16. ``parts``: (row indices or
    None for all rows, partial ``[n, H]`` bf16)."""
    acc = torch.zeros(rows, hidden, dtype=torch.float32, device=device)
    for idx, part in parts:
        if idx is None:
            acc += part.float()
        elif idx.numel():
            acc.index_add_(0, idx, part.float())
    return acc.to(torch.bfloat16)


__all__ = ["Numerics", "wire_encode", "wire_decode", "reduce_partials", "WIRE_GROUP"]
