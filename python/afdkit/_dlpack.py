"""Handing torch tensors to the native core without tying it to a torch build."""

from __future__ import annotations

import torch


def capsule(t: torch.Tensor) -> object:
    """A DLPack capsule of ``t`` for one native call.

    No stream synchronisation is requested (``stream=-1``): every afdkit op runs on
    the stream it is given, which is the caller's current stream, so the producer's
    work is already ordered before it.
    """
    if t.device.type == "cuda":
        return t.__dlpack__(stream=-1, max_version=(1, 1))
    return t.__dlpack__(max_version=(1, 1))


def stream_of(t: torch.Tensor) -> int:
    """The raw handle of the current CUDA stream on ``t``'s device (0 for CPU)."""
    if t.device.type != "cuda":
        return 0
    return torch.cuda.current_stream(t.device).cuda_stream
