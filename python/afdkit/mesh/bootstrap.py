"""Bootstrap of a mesh through a key-value store, joined only with a shared secret.

Every rank publishes one *sealed record* (its UCX worker address, pid, host and the
remote keys of its registered buffers) under ``afdkit.mesh/<mesh_id>/record/<rank>``.
The secret itself never leaves the process: records are encrypted with a keystream
derived from it (HMAC-SHA256 in counter mode) and authenticated with HMAC-SHA256
over (mesh id, rank, nonce, ciphertext), the plaintext holding the rank's role and
worker address. A rank with a wrong secret can neither read the others' remote keys
(so it cannot write into their memory) nor produce a record they accept.

After verifying every peer, each rank publishes a verdict (the ranks it refused); all
ranks read all verdicts, so the refused rank learns who refused it and the honest
ranks learn the stranger, and everyone raises :class:`MeshAuthError` before any
endpoint is created.

The store needs ``set(key, bytes)`` and ``get(key) -> bytes``; ``wait(keys, timedelta)``
(``torch.distributed.TCPStore``) or ``check(keys)`` is used when present so that no
read blocks past the bootstrap timeout. Use a fresh ``mesh_id`` per job: keys are
never deleted (not every store can).
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import os
import socket
import time
from typing import Any, Protocol

from afdkit.mesh.errors import MeshTimeout, auth_error

_MAGIC = b"AFDM1"
_NONCE = 16
_TAG = 32


class Store(Protocol):
    def set(self, key: str, value: bytes) -> None: ...

    def get(self, key: str) -> bytes: ...


def namespace(mesh_id: str) -> str:
    return f"afdkit.mesh/{mesh_id}"


def host_id() -> str:
    """Identifies this host (and boot): peers with equal ids share memory and GPUs."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


# ---- sealing ---------------------------------------------------------------------


def _keys(secret: bytes) -> tuple[bytes, bytes]:
    enc = hmac.new(secret, b"afdkit.mesh/encrypt", hashlib.sha256).digest()
    mac = hmac.new(secret, b"afdkit.mesh/authenticate", hashlib.sha256).digest()
    return enc, mac


def _keystream(key: bytes, nonce: bytes, n: int) -> bytes:
    blocks = (n + 31) // 32
    return b"".join(
        hmac.new(key, nonce + i.to_bytes(8, "little"), hashlib.sha256).digest() for i in range(blocks)
    )[:n]


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(len(a), "little")


def _mac(key: bytes, mesh_id: str, rank: int, nonce: bytes, ct: bytes) -> bytes:
    msg = mesh_id.encode() + b"\0" + rank.to_bytes(4, "little") + nonce + ct
    return hmac.new(key, msg, hashlib.sha256).digest()


def seal(secret: bytes, mesh_id: str, rank: int, payload: bytes) -> bytes:
    enc, mac = _keys(secret)
    nonce = os.urandom(_NONCE)
    ct = _xor(payload, _keystream(enc, nonce, len(payload)))
    return _MAGIC + nonce + _mac(mac, mesh_id, rank, nonce, ct) + ct


def unseal(secret: bytes, mesh_id: str, rank: int, blob: bytes) -> bytes | None:
    """The payload, or None when the blob was not sealed with this secret for this rank."""
    head = len(_MAGIC) + _NONCE + _TAG
    if len(blob) < head or not blob.startswith(_MAGIC):
        return None
    nonce = blob[len(_MAGIC) : len(_MAGIC) + _NONCE]
    tag = blob[len(_MAGIC) + _NONCE : head]
    ct = blob[head:]
    enc, mac = _keys(secret)
    if not hmac.compare_digest(tag, _mac(mac, mesh_id, rank, nonce, ct)):
        return None
    return _xor(ct, _keystream(enc, nonce, len(ct)))


# ---- store access with deadlines --------------------------------------------------------


def store_get(store: Store, key: str, deadline: float, what: str) -> bytes:
    """``store.get(key)`` that raises MeshTimeout at ``deadline`` (time.monotonic())."""
    remaining = deadline - time.monotonic()
    if hasattr(store, "wait"):
        try:
            store.wait([key], datetime.timedelta(seconds=max(remaining, 0.001)))
        except Exception as exc:  # torch raises DistStoreError / RuntimeError on timeout
            raise MeshTimeout(f"afdkit.mesh bootstrap: {what} did not appear in the store "
                              f"(key {key!r}) within the timeout: {exc}") from None
    elif hasattr(store, "check"):
        while not store.check([key]):
            if time.monotonic() > deadline:
                raise MeshTimeout(f"afdkit.mesh bootstrap: {what} did not appear in the store (key {key!r})")
            time.sleep(0.005)
    value = store.get(key)
    return value if isinstance(value, bytes) else bytes(value)


def barrier(store: Store, mesh_id: str, name: str, rank: int, world_size: int, timeout_s: float) -> None:
    ns = namespace(mesh_id)
    store.set(f"{ns}/barrier/{name}/{rank}", b"1")
    deadline = time.monotonic() + timeout_s
    for r in range(world_size):
        store_get(store, f"{ns}/barrier/{name}/{r}", deadline, f"rank {r} at barrier '{name}'")


# ---- exchange -------------------------------------------------------------------------------


def exchange(
    store: Store, mesh_id: str, rank: int, world_size: int, secret: bytes, record: dict[str, Any], timeout_s: float
) -> dict[int, dict[str, Any]]:
    """Publishes this rank's sealed record and returns every peer's verified record.

    Raises MeshAuthError on every rank if any rank refused any other, and MeshTimeout
    if a rank did not publish within ``timeout_s``.
    """
    ns = namespace(mesh_id)
    deadline = time.monotonic() + timeout_s
    payload = json.dumps(record, sort_keys=True).encode()
    store.set(f"{ns}/record/{rank}", seal(secret, mesh_id, rank, payload))
    peers: dict[int, dict[str, Any]] = {}
    refused: list[int] = []
    for r in range(world_size):
        if r == rank:
            continue
        blob = store_get(store, f"{ns}/record/{r}", deadline, f"the record of rank {r}")
        plain = unseal(secret, mesh_id, r, blob)
        rec = json.loads(plain) if plain is not None else None
        if rec is None or rec.get("rank") != r or rec.get("world_size") != world_size:
            refused.append(r)
        else:
            peers[r] = rec
    store.set(f"{ns}/verdict/{rank}", json.dumps({"refused": refused}).encode())
    refused_by: list[int] = []
    everyone: dict[int, list[int]] = {rank: refused}
    for r in range(world_size):
        if r == rank:
            continue
        verdict = json.loads(store_get(store, f"{ns}/verdict/{r}", deadline, f"the verdict of rank {r}"))
        everyone[r] = list(verdict.get("refused", []))
        if rank in everyone[r]:
            refused_by.append(r)
    if any(everyone.values()):
        raise auth_error(_auth_message(mesh_id, rank, refused, refused_by, everyone), refused, refused_by)
    return peers


def _auth_message(
    mesh_id: str, rank: int, refused: list[int], refused_by: list[int], everyone: dict[int, list[int]]
) -> str:
    world = len(everyone)
    count = {r: sum(1 for q, v in everyone.items() if q != r and r in v) for r in everyone}
    # The stranger is the rank most others refuse; with two ranks the store cannot tell.
    strangers = sorted(r for r, c in count.items() if c and 2 * c > world - 1)
    head = f"afdkit.mesh '{mesh_id}': authentication failed on rank {rank}: "
    if rank in strangers and len(strangers) < world:
        return head + (f"this rank (rank {rank}) was refused by rank(s) {refused_by}: its mesh secret does not "
                       "match theirs")
    named = [r for r in strangers if r != rank] or sorted({r for v in everyone.values() for r in v} - {rank})
    msg = head + (f"rank(s) {named} presented records that do not verify with the mesh secret "
                  f"(refused by rank(s) {sorted(q for q, v in everyone.items() if set(named) & set(v))})")
    if refused_by:
        msg += (f"; rank {rank} was in turn refused by rank(s) {refused_by} (with two ranks the store cannot tell "
                "which one holds the wrong secret)")
    return msg


__all__ = ["Store", "seal", "unseal", "exchange", "barrier", "store_get", "host_id", "namespace"]
