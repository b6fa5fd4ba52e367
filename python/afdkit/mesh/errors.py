"""Exceptions of the mesh transport.

They are defined by the native core (``afdkit._C.mesh``) so that C++ and Python raise
the same classes::

    MeshError(RuntimeError)
      MeshTimeout     a wait ran past its timeout (names peer, key and time waited)
      MeshPeerLost    a peer process died or closed, or another rank reported a loss
      MeshAuthError   a rank presented a record that does not verify with the secret
"""

from __future__ import annotations

from afdkit._native import native

_m = native().mesh

MeshError = _m.MeshError
MeshTimeout = _m.MeshTimeout
MeshPeerLost = _m.MeshPeerLost
MeshAuthError = _m.MeshAuthError


def auth_error(message: str, refused: list[int], refused_by: list[int]) -> BaseException:
    """A MeshAuthError carrying who this rank refused and who refused it."""
    err = MeshAuthError(message)
    err.refused = list(refused)
    err.refused_by = list(refused_by)
    return err


__all__ = ["MeshError", "MeshTimeout", "MeshPeerLost", "MeshAuthError", "auth_error"]
