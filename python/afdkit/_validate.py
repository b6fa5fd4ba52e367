"""Argument checks shared by the typed ops: every message names the op, the
argument, what was expected and what was given, and is raised before any launch."""

from __future__ import annotations

from typing import Iterable

import torch


def _desc(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)} on {t.device}"


def is_tensor(op: str, name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: argument '{name}' must be a torch.Tensor, got {type(t).__name__}")
    return t


def dtype(op: str, name: str, t: torch.Tensor, allowed: Iterable[torch.dtype]) -> None:
    allowed = tuple(allowed)
    if t.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise TypeError(f"{op}: argument '{name}' must have dtype one of ({names}), got {_desc(t)}")


def ndim(op: str, name: str, t: torch.Tensor, n: int, layout: str) -> None:
    if t.dim() != n:
        raise ValueError(f"{op}: argument '{name}' must have {n} dimensions {layout}, got {_desc(t)}")


def size(op: str, name: str, t: torch.Tensor, dim: int, expected: int, what: str) -> None:
    if t.shape[dim] != expected:
        raise ValueError(
            f"{op}: argument '{name}' must have size {expected} in dimension {dim} ({what}), got {_desc(t)}"
        )


def contiguous(op: str, name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(
            f"{op}: argument '{name}' must be contiguous, got strides {list(t.stride())} for shape {list(t.shape)}"
        )


def same_device(op: str, tensors: dict[str, torch.Tensor | None]) -> torch.device:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{op}: all tensors must be on one device, but '{first_name}' is on {first.device} "
                f"and '{name}' is on {t.device}"
            )
    return first.device
