"""afdkit.mesh core: bootstrap + secret, put/signal/wait over UCX tcp and shared memory,
timeouts, unknown regions, a dead peer. Multi-process on 127.0.0.1 only."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from afdkit.mesh.testing import UCX_ENVS, RankContext, check_all_ok, run_ranks

pytestmark = pytest.mark.multiproc
TRANSPORTS = sorted(UCX_ENVS)


def _mesh(ctx: RankContext, timeout_s: float = 10.0, secret: bytes = b"core-secret", **kw):
    from afdkit.mesh import Mesh, MeshConfig

    return Mesh(ctx.rank, ctx.world_size, ctx.role,
                MeshConfig(mesh_id=ctx.args.get("mesh_id", "core"), timeout_s=timeout_s, **kw))


def test_seal_roundtrip_and_tamper() -> None:
    from afdkit.mesh.bootstrap import seal, unseal

    blob = seal(b"k1", "m", 3, b"payload" * 50)
    assert unseal(b"k1", "m", 3, blob) == b"payload" * 50
    assert unseal(b"k2", "m", 3, blob) is None  # wrong secret
    assert unseal(b"k1", "m", 4, blob) is None  # replayed under another rank
    assert unseal(b"k1", "other", 3, blob) is None  # replayed into another mesh
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    assert unseal(b"k1", "m", 3, tampered) is None
    assert b"payload" not in blob  # the record (remote keys) is not readable without the secret


def _pingpong(ctx: RankContext) -> dict:
    from afdkit.mesh import MeshError, MeshTimeout

    m = _mesh(ctx)
    buf = m.alloc("buf", 1 << 16)
    m.alloc("sig", 64)
    user = m.register("user", torch.zeros(256, dtype=torch.int64))  # caller-owned memory works too
    m.connect(ctx.store(), b"core-secret")
    peer = 1 - ctx.rank
    g = torch.Generator().manual_seed(7)
    for i in range(1, 201):
        n = int(torch.randint(1, 1 << 16, (1,), generator=g))
        data = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
        if (i % 2 == 1) == (ctx.rank == 0):  # alternate writer
            m.put(data, peer, "buf", signal=("sig", 0, i))
            m.put(torch.full((256,), i, dtype=torch.int64), peer, "user", signal=("sig", 8, i))
        else:
            m.wait("sig", 0, i, peer=peer)
            m.wait("sig", 8, i, peer=peer)
            assert torch.equal(buf[:n], data), f"message {i}: content differs"
            assert bool((user == i).all())
    errors = {}
    for name, call in {
        "unknown_region": lambda: m.put(buf[:8], peer, "nope"),
        "overflow": lambda: m.put(buf, peer, "sig"),
        "bad_signal": lambda: m.wait("sig", 3, 1),
    }.items():
        try:
            call()
        except (ValueError, MeshError) as exc:
            errors[name] = type(exc).__name__
    t0 = time.monotonic()
    try:
        m.wait("sig", 16, 1, timeout_s=0.3, what="a signal nobody sends")
    except MeshTimeout as exc:
        errors["timeout"] = (str(exc), time.monotonic() - t0)
    m.flush()
    m.close()
    return errors


@pytest.mark.timeout(90)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_put_signal_wait(transport: str) -> None:
    vals = check_all_ok(run_ranks(_pingpong, ["attention", "ffn"], env=UCX_ENVS[transport], timeout_s=60))
    for errors in vals:
        assert errors["unknown_region"] == "ValueError"
        assert errors["overflow"] == "ValueError"
        assert errors["bad_signal"] == "ValueError"
        msg, waited = errors["timeout"]
        assert "a signal nobody sends" in msg and "rank" in msg and 0.25 < waited < 3.0


def _join(ctx: RankContext) -> str:
    from afdkit.mesh import MeshAuthError

    secret = b"wrong" if ctx.rank == ctx.args["stranger"] else b"right"
    m = _mesh(ctx, secret=secret)
    m.alloc("buf", 64)
    try:
        m.connect(ctx.store(), secret)
    except MeshAuthError as exc:
        return f"{exc.refused}|{exc.refused_by}|{exc}"
    finally:
        m.close()
    return "connected"


@pytest.mark.timeout(60)
def test_wrong_secret_is_refused() -> None:
    roles = ["attention", "attention", "ffn"]
    out = check_all_ok(run_ranks(_join, roles, args={"stranger": 2}, env=UCX_ENVS["tcp"], timeout_s=45))
    for rank in (0, 1):
        refused, _, msg = out[rank].split("|", 2)
        assert refused == "[2]" and "rank(s) [2] presented records that do not verify" in msg, msg
    _, refused_by, msg = out[2].split("|", 2)
    assert refused_by == "[0, 1]" and "was refused by rank(s) [0, 1]" in msg, msg


def _victim(ctx: RankContext) -> dict:
    """Rank 1 dies (SIGKILL) after 20 exchanges; rank 0 must raise, not hang."""
    from afdkit.mesh import MeshPeerLost, MeshTimeout

    m = _mesh(ctx, timeout_s=ctx.args["timeout_s"], keepalive_s=0.5)
    m.alloc("sig", 64)
    m.connect(ctx.store(), b"core-secret")
    peer = 1 - ctx.rank
    for i in range(1, 10_000):
        if ctx.rank == 1 and i == 20:
            os.kill(os.getpid(), signal.SIGKILL)
        try:
            if ctx.rank == 0:
                m.put(torch.zeros(8, dtype=torch.uint8), peer, "sig", signal=("sig", 8, i))
                t0 = time.monotonic()
                m.wait("sig", 0, i, peer=peer)
            else:
                m.wait("sig", 8, i, peer=peer)
                m.put(torch.zeros(8, dtype=torch.uint8), peer, "sig", signal=("sig", 0, i))
        except (MeshPeerLost, MeshTimeout) as exc:
            return {"type": type(exc).__name__, "msg": str(exc), "after_s": time.monotonic() - t0, "i": i}
    return {"type": "none"}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_dead_peer_raises(transport: str) -> None:
    timeout_s = 8.0
    res = run_ranks(_victim, ["attention", "ffn"], args={"timeout_s": timeout_s}, env=UCX_ENVS[transport],
                    timeout_s=45)
    assert not res[1].ok and res[1].exitcode == -signal.SIGKILL
    assert res[0].ok, res[0].error
    out = res[0].value
    assert out["type"] in ("MeshPeerLost", "MeshTimeout"), out
    assert out["after_s"] < timeout_s + 1.0, out
    assert "rank 1" in out["msg"], out


def _zero_copy_victim(ctx: RankContext) -> dict:
    """tcp: large puts are UCX's zero-copy put also on endpoints with error handling
    (the engine turns rendezvous off, see make_context); rank 1 checks a few 1 MB
    messages, then dies (SIGKILL) while rank 0 streams more: rank 0 must raise."""
    from afdkit.mesh import MeshPeerLost, MeshTimeout

    m = _mesh(ctx, timeout_s=ctx.args["timeout_s"], keepalive_s=0.5, err_mode=ctx.args["err_mode"])
    size = 1 << 20
    src = m.alloc("src", size)
    buf = m.alloc("buf", size)
    m.alloc("sig", 64)
    m.connect(ctx.store(), b"core-secret")
    peer, info, t0 = 1 - ctx.rank, "", time.monotonic()
    for i in range(1, 10_000):
        try:
            if ctx.rank == 0:
                src.fill_(i % 251)
                m.put(src, peer, "buf", nbytes=size // 2)  # unsignalled, then a signalled put
                m.put(src[size // 2:], peer, "buf", size // 2, signal=("sig", 8, i))
                t0 = time.monotonic()
                m.wait("sig", 0, i, peer=peer)  # rank 1 checked the data: src may change
                if i == 3:
                    info = m.endpoint_info(peer)
            else:
                m.wait("sig", 8, i, peer=peer)
                assert bool((buf == i % 251).all()), f"message {i}: stale data after the signal"
                if i == 5:
                    os.kill(os.getpid(), signal.SIGKILL)
                m.put(src[:8], peer, "sig", nbytes=0, signal=("sig", 0, i))
        except (MeshPeerLost, MeshTimeout) as exc:
            return {"type": type(exc).__name__, "msg": str(exc), "after_s": time.monotonic() - t0, "i": i,
                    "info": info}
    return {"type": "none"}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("err_mode", ["auto", "none"])
def test_tcp_zero_copy_puts_and_dead_peer(err_mode: str) -> None:
    timeout_s = 8.0
    res = run_ranks(_zero_copy_victim, ["attention", "ffn"], args={"timeout_s": timeout_s, "err_mode": err_mode},
                    env=UCX_ENVS["tcp"], timeout_s=45)
    assert not res[1].ok and res[1].exitcode == -signal.SIGKILL
    assert res[0].ok, res[0].error
    out = res[0].value
    assert out["type"] in ("MeshPeerLost", "MeshTimeout"), out
    assert out["i"] == 5 and out["after_s"] < timeout_s + 1.0, out
    assert "rank 1" in out["msg"], out
    # auto: UCX error handling (mode PEER) with tcp's zero-copy put ("rma_bw" lane).
    assert f"err_mode {'peer' if err_mode == 'auto' else 'none'}" in out["info"], out["info"]
    assert "rma_bw" in out["info"], out["info"]


def _bulk_then_signal(ctx: RankContext) -> int:
    """Several large puts without a signal, then a signal-only put (and the fused
    put_message): the signal must never overtake the data (it did on shm, unfenced)."""
    m = _mesh(ctx, timeout_s=30.0)
    src = m.alloc("src", 1 << 20)
    buf = m.alloc("buf", 1 << 20)
    m.alloc("sig", 64)
    m.connect(ctx.store(), b"core-secret")
    peer, seq, checked = 1 - ctx.rank, 0, 0
    e = m.engine
    rb, rs = m.remote(peer, "buf").handle, m.remote(peer, "sig").handle
    for size in (256 << 10, 1 << 20):
        for i in range(12):
            seq += 1
            value = seq % 251
            if ctx.rank == 0:
                src[:size].fill_(value)
                if i % 2:
                    for _ in range(3):
                        m.put(src, peer, "buf", nbytes=size)
                    m.put(src, peer, "buf", nbytes=0, signal=("sig", 0, seq))
                else:  # two segments and a header word in one call
                    half = size // 2
                    e.put_message(peer, rb, [(src.data_ptr(), half, 0), (src.data_ptr() + half, size - half - 8, half)],
                                  [(size - 8, value * 0x0101010101010101)], rs, 0, seq)
                m.wait("sig", 0, seq, peer=peer)  # the acknowledgement: src may change again
            else:
                m.wait("sig", 0, seq, peer=peer)
                assert bool((buf[:size] == value).all()), f"{size} B message {i}: stale data after the signal"
                checked += 1
                m.put(src, peer, "buf", nbytes=0, signal=("sig", 0, seq))
    m.flush()
    m.close()
    return checked


@pytest.mark.timeout(90)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_signal_never_overtakes_bulk_puts(transport: str) -> None:
    vals = check_all_ok(run_ranks(_bulk_then_signal, ["attention", "ffn"], env=UCX_ENVS[transport], timeout_s=80))
    assert vals[1] == 24


def _mixed_paths(ctx: RankContext) -> dict:
    """Rounds of messages whose sizes cross every path (fused active messages up to
    128 KiB over tcp, fenced puts above, signal-only, unsignalled bulk then a signal),
    posted back to back without waiting in between: each signal must find its own data."""
    m = _mesh(ctx, timeout_s=30.0, spin_us=50, **ctx.args["cfg"])
    slot, sizes = 300 << 10, [8, 4096, 100 << 10, 128 << 10, (128 << 10) + 8, 300 << 10, 0, 64]
    src = m.alloc("src", slot * len(sizes))
    buf = m.alloc("buf", slot * len(sizes))
    sig = m.alloc("sig", 8 * (len(sizes) + 1))
    m.connect(ctx.store(), b"core-secret")
    peer, ack, checked = 1 - ctx.rank, 8 * len(sizes), 0
    cpu0 = time.process_time()  # all threads of this process
    time.sleep(0.3)  # idle: the progress thread must sleep (epoll), not spin
    idle_cpu = time.process_time() - cpu0

    def payload(r: int, k: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(1000 * r + k)
        return torch.randint(0, 256, (sizes[k],), dtype=torch.uint8, generator=g)

    for r in range(1, 7):
        for k, n in enumerate(sizes):
            if ctx.rank == 0:
                src[k * slot:k * slot + n] = payload(r, k)
                view = src[k * slot:k * slot + max(n, 1)]
                if k == 5 and r % 2:  # bulk without a signal, then a signal-only put
                    m.put(view, peer, "buf", k * slot, nbytes=n)
                    m.put(view, peer, "buf", k * slot, nbytes=0, signal=("sig", 8 * k, r))
                else:
                    m.put(view, peer, "buf", k * slot, nbytes=n, signal=("sig", 8 * k, r))
            else:
                m.wait("sig", 8 * k, r, peer=peer)
                assert sig[8 * k:8 * k + 8].view(torch.int64).item() == r, f"round {r} size {n}: signal value"
                assert torch.equal(buf[k * slot:k * slot + n], payload(r, k)), f"round {r}, {n} B: stale data"
                checked += 1
        if ctx.rank == 0:
            m.wait("sig", ack, r, peer=peer)  # the sources may change again
        else:
            m.put(src[:8], peer, "sig", nbytes=0, signal=("sig", ack, r))
    m.flush()
    m.close()
    return {"checked": checked, "idle_cpu": idle_cpu}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport,cfg", [("tcp", {}), ("tcp", {"fused_max_bytes": 0}), ("shm", {}),
                                           ("shm", {"direct_max_bytes": 0}), ("shm", {"direct_max_bytes": 4096})])
def test_mixed_message_paths(transport: str, cfg: dict) -> None:
    vals = check_all_ok(run_ranks(_mixed_paths, ["attention", "ffn"], args={"cfg": cfg}, env=UCX_ENVS[transport],
                                  timeout_s=100))
    assert vals[1]["checked"] == 6 * 8
    for v in vals:  # 0.3 s idle: epoll sleeps of keepalive/4 (a spinning thread would use ~0.3 s)
        assert v["idle_cpu"] < 0.06, v


def _late_message(ctx: RankContext) -> float:
    """The writer sends long after the reader's spin window ended: the reader sleeps and
    the progress thread (over tcp it must land the data) wakes it."""
    m = _mesh(ctx, spin_us=20)
    m.alloc("sig", 64)
    m.connect(ctx.store(), b"core-secret")
    peer, waited = 1 - ctx.rank, 0.0
    for i in range(1, 4):
        if ctx.rank == 0:
            t0 = time.monotonic()
            m.wait("sig", 0, i, peer=peer)
            waited = max(waited, time.monotonic() - t0 - 0.2)
            m.put(torch.zeros(8, dtype=torch.uint8), peer, "sig", nbytes=0, signal=("sig", 8, i))
        else:
            time.sleep(0.2)
            m.put(torch.zeros(8, dtype=torch.uint8), peer, "sig", nbytes=0, signal=("sig", 0, i))
            m.wait("sig", 8, i, peer=peer)
    m.close()
    return waited


@pytest.mark.timeout(60)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_late_message_wakes_a_sleeping_wait(transport: str) -> None:
    late = check_all_ok(run_ranks(_late_message, ["attention", "ffn"], env=UCX_ENVS[transport], timeout_s=45))[0]
    assert late < 0.1, f"a message sent 0.2 s into a wait was seen {late * 1e3:.1f} ms late"


def _bad_engine_option(ctx: RankContext) -> list[str]:
    errors = []
    for opts in ({"AFDKIT_NO_SUCH_OPTION": "1"}, {"AFDKIT_FUSED_MAX_BYTES": "-1"}, {"AFDKIT_FUSED_MAX_BYTES": "1k"}):
        try:
            _mesh(ctx, ucx_options=opts).close()
            errors.append("accepted")
        except ValueError as exc:
            errors.append(str(exc))
    return errors


@pytest.mark.timeout(60)
def test_engine_options_are_checked() -> None:
    errors = check_all_ok(run_ranks(_bad_engine_option, ["attention"], env=UCX_ENVS["tcp"], timeout_s=45))[0]
    assert "unknown engine option AFDKIT_NO_SUCH_OPTION" in errors[0], errors
    assert all("AFDKIT_FUSED_MAX_BYTES must be a byte count" in e for e in errors[1:]), errors
