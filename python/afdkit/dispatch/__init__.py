"""Expert-parallel dispatch/combine across ranks (see :mod:`afdkit.dispatch.types` and docs/moe.md).

- :class:`Dispatcher`: the public facade; a Mesh selects the mesh backend, a
  torch.distributed group the CUDA IPC backend.
- :class:`MeshDispatcher` (``mesh_backend``): over :class:`afdkit.mesh.Mesh` (CPU, cross-host).
- :class:`IpcDispatcher` (``ipc``): over CUDA IPC between the GPUs of one host (NVLink);
  ``ipc_layout`` computes its buffer layout.
- ``validate``: argument checks shared by the backends; ``reference``: the single-process oracle.

The backends import the native extension lazily (through afdkit.mesh), so the contract,
checks and oracle import without it.
"""

from __future__ import annotations

from typing import Any

from afdkit.dispatch.dispatcher import BACKENDS, Dispatcher, choose_backend
from afdkit.dispatch.reference import reference_combine, reference_dispatch
from afdkit.dispatch.types import DispatchOutput
from afdkit.dispatch.validate import validate_combine, validate_dispatch


_IPC_NAMES = ("IpcDispatcher", "IpcHandle", "IpcLayout", "IpcError", "IpcTimeout", "ipc_layout")


def __getattr__(name: str) -> Any:
    if name in ("MeshDispatcher", "MeshHandle"):
        from afdkit.dispatch import mesh_backend

        return getattr(mesh_backend, name)
    if name in _IPC_NAMES:
        from afdkit.dispatch import ipc

        return getattr(ipc, name)
    raise AttributeError(f"module 'afdkit.dispatch' has no attribute {name!r}")


__all__ = ["DispatchOutput", "Dispatcher", "MeshDispatcher", "MeshHandle", "choose_backend", "BACKENDS",
           "validate_dispatch", "validate_combine", "reference_dispatch", "reference_combine", *_IPC_NAMES]
