"""The public expert-parallel dispatcher: one API over the mesh and CUDA IPC backends.

``Dispatcher(group_or_mesh, num_experts, max_tokens_per_rank, hidden, top_k)``:

- an :class:`afdkit.mesh.Mesh` selects the mesh backend
  (:class:`afdkit.dispatch.mesh_backend.MeshDispatcher`): CPU ranks, or ranks on several
  hosts;
- a ``torch.distributed`` process group (or ``None``: the default group) selects the CUDA
  IPC backend (``afdkit.dispatch.ipc.IpcDispatcher``): the GPUs of one host over NVLink.

Both return the same :class:`afdkit.dispatch.types.DispatchOutput` and take the same
``combine(expert_out, handle_or_output)``; backend-specific options pass through
``**options`` to the backend's constructor and through keyword arguments to its calls.
"""

from __future__ import annotations

from typing import Any

import torch

from afdkit.dispatch import validate as val
from afdkit.dispatch.types import DispatchOutput

BACKENDS = ("auto", "mesh", "ipc")


def _ipc_class() -> type:
    try:
        from afdkit.dispatch.ipc import IpcDispatcher
    except ImportError as exc:
        raise ImportError("afdkit.dispatch.Dispatcher: the CUDA IPC backend (afdkit.dispatch.ipc.IpcDispatcher) is "
                          f"not available in this build ({exc}); pass an afdkit.mesh.Mesh to use the mesh backend"
                          ) from exc
    return IpcDispatcher


def _is_mesh(obj: Any) -> bool:
    from afdkit.mesh.core import Mesh

    return isinstance(obj, Mesh)


def _is_group(obj: Any) -> bool:
    if obj is None:
        return True
    dist = torch.distributed
    return dist.is_available() and isinstance(obj, dist.ProcessGroup)


def choose_backend(group_or_mesh: Any, backend: str) -> str:
    """``"mesh"`` or ``"ipc"`` for what was given; raises on a mismatch."""
    op = "afdkit.dispatch.Dispatcher"
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if _is_mesh(group_or_mesh):
        if backend == "ipc":
            raise ValueError(f"{op}: backend 'ipc' takes a torch.distributed process group, got an afdkit.mesh.Mesh")
        return "mesh"
    if _is_group(group_or_mesh):
        if backend == "mesh":
            raise ValueError(f"{op}: backend 'mesh' takes a connected afdkit.mesh.Mesh, got a process group; "
                             "build a Mesh (afdkit.mesh) for CPU or cross-host ranks")
        if not torch.cuda.is_available():
            raise ValueError(f"{op}: the CUDA IPC backend needs CUDA GPUs; on CPU pass an afdkit.mesh.Mesh")
        return "ipc"
    raise TypeError(f"{op}: 'group_or_mesh' must be an afdkit.mesh.Mesh, a torch.distributed ProcessGroup or None "
                    f"(the default group), got {type(group_or_mesh).__name__}")


class Dispatcher:
    """Expert-parallel dispatch/combine (collective: every rank constructs it and makes
    the same calls in the same order). See the module docstring and docs/moe.md."""

    def __init__(self, group_or_mesh: Any, num_experts: int, max_tokens_per_rank: int, hidden: int, top_k: int, *,
                 quant: str = "fp8", backend: str = "auto", **options: Any) -> None:
        self.backend = choose_backend(group_or_mesh, backend)
        if self.backend == "mesh":
            from afdkit.dispatch.mesh_backend import MeshDispatcher

            self._impl = MeshDispatcher(group_or_mesh, num_experts, max_tokens_per_rank, hidden, top_k, quant,
                                        **options)
        else:
            group = group_or_mesh if group_or_mesh is not None else torch.distributed.group.WORLD
            ranks = torch.distributed.get_world_size(group)
            val.validate_config("afdkit.dispatch.Dispatcher", num_experts, ranks, max_tokens_per_rank, hidden, top_k,
                                quant)
            self._impl = _ipc_class()(group, num_experts, max_tokens_per_rank, hidden, top_k, quant, **options)
        self.num_experts, self.max_tokens_per_rank, self.hidden = num_experts, max_tokens_per_rank, hidden
        self.top_k, self.quant = top_k, quant

    @property
    def impl(self) -> Any:
        """The backend object (MeshDispatcher or IpcDispatcher)."""
        return self._impl

    @property
    def capacity(self) -> int:
        """Rows of the receive buffer: ranks * max_tokens_per_rank * min(top_k, experts per rank)."""
        return self._impl.capacity

    @property
    def num_local_experts(self) -> int:
        return self._impl.num_local_experts

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                 **kwargs: Any) -> DispatchOutput | Any:
        """``x`` bf16 ``[T, hidden]``, ``topk_ids`` int ``[T, top_k]``, ``topk_weights`` fp32
        ``[T, top_k]`` -> this rank's experts' rows (:class:`DispatchOutput`).
        ``return_recv_hook=True`` returns a callable that receives, after sending."""
        return self._impl.dispatch(x, topk_ids, topk_weights, **kwargs)

    def combine(self, expert_out: torch.Tensor, handle_or_output: Any, **kwargs: Any) -> torch.Tensor | Any:
        """``expert_out`` bf16 in dispatch's row order -> bf16 ``[T, hidden]`` weighted sums."""
        return self._impl.combine(expert_out, handle_or_output, **kwargs)


__all__ = ["Dispatcher", "choose_backend", "BACKENDS"]
