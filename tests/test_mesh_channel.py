"""The AFD channel over UCX tcp and shared memory on loopback: 1A1F, 2A1F, 2A2F, 3A2F,
broadcast and routed, >= 10,000 messages of random sizes per run with content checks
(no loss, no duplication, no reordering within a key), bad calls, a killed FFN rank."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from afdkit.mesh.testing import UCX_ENVS, RankContext, check_all_ok, run_ranks

pytestmark = pytest.mark.multiproc

MAX_TOKENS = 48
HIDDEN = 16
MB = 3
TOPOLOGIES = {"1A1F": (1, 1), "2A1F": (2, 1), "2A2F": (2, 2), "3A2F": (3, 2)}


def _specs():
    from afdkit.mesh import TensorSpec

    send = (TensorSpec("hidden", (HIDDEN,), torch.float32), TensorSpec("ids", (2,), torch.int32))
    recv = (TensorSpec("y", (HIDDEN,), torch.float32),)
    return send, recv


def _rows(a: int, layer: int, mb: int, n_ffn: int, mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What attention rank a sends for (layer, mb): random row count (0..MAX_TOKENS),
    integer-valued contents (exact in fp32) and, routed, a random per-row mask."""
    g = torch.Generator().manual_seed(((a * 100_003 + layer) * 7 + mb) * 31 + len(mode))
    n = int(torch.randint(0, MAX_TOKENS + 1, (1,), generator=g))
    hidden = torch.randint(-1000, 1000, (n, HIDDEN), generator=g).float()
    ids = torch.stack([torch.full((n,), a * 1_000_000 + layer * 10 + mb, dtype=torch.int32),
                       torch.arange(n, dtype=torch.int32)], 1)
    mask = torch.rand(n, n_ffn, generator=g) < 0.6
    return hidden, ids, mask


def _ffn_fn(x: torch.Tensor, f: int, layer: int) -> torch.Tensor:
    return x * (f + 1) + layer  # what FFN index f returns for rows x (exact in fp32)


def _attention(ch, ctx: RankContext, mode: str, layers: int, n_ffn: int) -> int:
    a = ch.att.index(ctx.rank)
    for layer in range(layers):
        sent = {}
        for mb in range(MB):
            hidden, ids, mask = _rows(a, layer, mb, n_ffn, mode)
            ch.send(layer, mb, (hidden, ids), routing=mask if mode == "routed" else None)
            sent[mb] = (hidden, mask)
        for mb in range(MB):
            y = ch.recv(layer, mb)
            hidden, mask = sent[mb]
            want = torch.zeros_like(hidden)
            for f in range(n_ffn):
                rows = mask[:, f] if mode == "routed" else torch.ones(hidden.shape[0], dtype=torch.bool)
                want[rows] += _ffn_fn(hidden[rows], f, layer)
            assert torch.equal(y, want), f"rank {ctx.rank} layer {layer} mb {mb}: results differ"
    assert ch.pending() == {"sent": 0, "batches": 0}
    return layers * MB * n_ffn * 2  # messages this rank sent + received


def _ffn(ch, ctx: RankContext, mode: str, layers: int, n_ffn: int) -> int:
    f = ch.ffn.index(ctx.rank)
    for layer in range(layers):
        for mb in range(MB):
            b = ch.recv_batch(layer, mb)
            assert b.sources == ch.att
            start = 0
            for ai, a in enumerate(ch.att):
                hidden, ids, mask = _rows(a, layer, mb, n_ffn, mode)
                rows = mask[:, f].nonzero().flatten() if mode == "routed" else torch.arange(hidden.shape[0])
                m = b.counts[ai]
                assert m == rows.numel(), f"layer {layer} mb {mb} from {a}: {m} rows, expected {rows.numel()}"
                assert torch.equal(b.tensors[0][start : start + m], hidden[rows])
                assert torch.equal(b.tensors[1][start : start + m], ids[rows])  # also proves order within a key
                if mode == "routed":
                    assert torch.equal(b.row_index[ai], rows)
                start += m
            ch.send_back(layer, mb, _ffn_fn(b.tensors[0], f, layer))
    assert ch.pending() == {"sent": 0, "batches": 0}
    return layers * MB * len(ch.att) * 2


def _bad_calls(ch, ctx: RankContext) -> list[str]:
    """Oversize and unknown-key calls raise before anything moves."""
    out = []
    cases = []
    if ch.is_attention:
        big = torch.zeros(MAX_TOKENS + 1, HIDDEN)
        cases += [lambda: ch.send(0, 0, (big, torch.zeros(MAX_TOKENS + 1, 2, dtype=torch.int32))),
                  lambda: ch.recv(0, 1),  # nothing sent for this key
                  lambda: ch.send(0, MB, (big[:1], torch.zeros(1, 2, dtype=torch.int32))),  # unknown microbatch
                  lambda: ch.send(0, 0, (big[:1].double(), torch.zeros(1, 2, dtype=torch.int32)))]  # dtype
    else:
        cases += [lambda: ch.send_back(0, 0, torch.zeros(1, HIDDEN)),  # no batch pending
                  lambda: ch.recv_batch(-1, 0)]
    for c in cases:
        try:
            c()
            out.append("no error")
        except (ValueError, TypeError) as exc:
            out.append(type(exc).__name__)
    return out


def _run(ctx: RankContext) -> dict:
    from afdkit.mesh import AfdChannel, ChannelConfig, Mesh, MeshConfig

    mesh = Mesh(ctx.rank, ctx.world_size, ctx.role, MeshConfig(mesh_id="channel", timeout_s=30))
    mesh.connect(ctx.store(), b"channel-secret")
    send, recv = _specs()
    n_ffn = ctx.roles.count("ffn")
    out = {"messages": 0}
    for mode in ("broadcast", "routed"):
        ch = AfdChannel(mesh, ChannelConfig(max_tokens=MAX_TOKENS, send=send, recv=recv, mode=mode,
                                            num_microbatches=MB, name=mode))
        if mode == "broadcast":
            out["bad"] = _bad_calls(ch, ctx)
        body = _attention if ch.is_attention else _ffn
        out["messages"] += body(ch, ctx, mode, ctx.args["layers"], n_ffn)
    mesh.close()
    return out


def _layers_for(n_att: int, n_ffn: int, messages: int) -> int:
    per_layer = MB * n_att * n_ffn * 2  # A->F and F->A messages of one layer, whole mesh
    return -(-messages // (2 * per_layer))  # two routing modes share the count


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", sorted(UCX_ENVS))
@pytest.mark.parametrize("topology", sorted(TOPOLOGIES))
def test_channel_stress(topology: str, transport: str) -> None:
    n_att, n_ffn = TOPOLOGIES[topology]
    roles = ["attention"] * n_att + ["ffn"] * n_ffn
    # 10,000 messages per run on the largest mesh; the smaller ones a share of it.
    target = 10_000 if topology == "3A2F" else 2_500
    layers = _layers_for(n_att, n_ffn, target)
    vals = check_all_ok(run_ranks(_run, roles, args={"layers": layers}, env=UCX_ENVS[transport], timeout_s=100))
    total = sum(v["messages"] for v in vals) // 2  # each message counted by sender and receiver
    assert total >= target
    for r, v in enumerate(vals):
        assert v["bad"] and set(v["bad"]) <= {"ValueError", "TypeError"}, (r, v["bad"])


def _killed(ctx: RankContext) -> dict:
    from afdkit.mesh import AfdChannel, ChannelConfig, Mesh, MeshConfig, MeshPeerLost, MeshTimeout

    mesh = Mesh(ctx.rank, ctx.world_size, ctx.role,
                MeshConfig(mesh_id="killed", timeout_s=ctx.args["timeout_s"], keepalive_s=0.5))
    mesh.connect(ctx.store(), b"channel-secret")
    send, recv = _specs()
    ch = AfdChannel(mesh, ChannelConfig(max_tokens=MAX_TOKENS, send=send, recv=recv, num_microbatches=MB))
    last = time.monotonic()
    try:
        for layer in range(1000):
            if ctx.rank == ctx.args["victim"] and layer == 5:
                os.kill(os.getpid(), signal.SIGKILL)
            for mb in range(MB):
                if ch.is_attention:
                    x = torch.ones(8, HIDDEN)
                    ch.send(layer, mb, (x, torch.zeros(8, 2, dtype=torch.int32)))
                    ch.recv(layer, mb)
                else:
                    b = ch.recv_batch(layer, mb)
                    ch.send_back(layer, mb, b.tensors[0])
                last = time.monotonic()
    except (MeshPeerLost, MeshTimeout) as exc:
        return {"type": type(exc).__name__, "msg": str(exc), "after_s": time.monotonic() - last}
    return {"type": "none"}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("transport", sorted(UCX_ENVS))
def test_killed_ffn_fails_everyone(transport: str) -> None:
    timeout_s = 8.0
    roles = ["attention", "attention", "ffn", "ffn"]
    res = run_ranks(_killed, roles, args={"timeout_s": timeout_s, "victim": 3}, env=UCX_ENVS[transport],
                    timeout_s=45)
    assert not res[3].ok and res[3].exitcode == -signal.SIGKILL
    for r in (0, 1, 2):  # both attention ranks and the surviving FFN rank fail promptly
        assert res[r].ok, res[r].error
        out = res[r].value
        assert out["type"] in ("MeshPeerLost", "MeshTimeout"), (r, out)
        assert out["after_s"] < timeout_s, (r, out)
        assert "rank 3" in out["msg"] or out["type"] == "MeshTimeout", (r, out)
