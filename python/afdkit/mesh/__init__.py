"""afdkit.mesh: one-sided transport between attention and FFN ranks.

- :class:`Mesh` / :class:`MeshConfig` (``core``): ranks with roles, bootstrap through a
  key-value store with a shared secret, registered buffers, put + signal, waits.
- :class:`AfdChannel` / :class:`ChannelConfig` (``channel``): the per-layer,
  per-microbatch A->F->A exchange of AFD decoding (broadcast or routed).
- ``trace``: per-message timestamps and Chrome trace export.
- Errors: :class:`MeshError` and its subclasses :class:`MeshTimeout`,
  :class:`MeshPeerLost`, :class:`MeshAuthError`.

See docs/mesh.md.
"""

from __future__ import annotations

from afdkit.mesh.channel import AfdChannel, Batch, ChannelConfig, TensorSpec
from afdkit.mesh.channel_stream import DeviceBatch
from afdkit.mesh.core import ROLES, Mesh, MeshConfig, RemoteRegion
from afdkit.mesh.errors import MeshAuthError, MeshError, MeshPeerLost, MeshTimeout
from afdkit.mesh.trace import chrome_trace, message_spans, write_chrome_trace

__all__ = [
    "Mesh", "MeshConfig", "RemoteRegion", "ROLES",
    "AfdChannel", "ChannelConfig", "TensorSpec", "Batch", "DeviceBatch",
    "MeshError", "MeshTimeout", "MeshPeerLost", "MeshAuthError",
    "chrome_trace", "message_spans", "write_chrome_trace",
]
