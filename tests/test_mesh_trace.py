"""Per-message timestamps (enqueue, posted, completed, delivered, consumed) and the
Chrome trace export, on a 1A1F channel over shared memory."""

from __future__ import annotations

import json

import pytest
import torch

from afdkit.mesh.testing import UCX_ENVS, RankContext, check_all_ok, run_ranks

pytestmark = pytest.mark.multiproc


def _traced(ctx: RankContext) -> list:
    from afdkit.mesh import AfdChannel, ChannelConfig, Mesh, MeshConfig, TensorSpec

    mesh = Mesh(ctx.rank, ctx.world_size, ctx.role, MeshConfig(mesh_id="trace", timeout_s=20, trace=True))
    mesh.connect(ctx.store(), b"trace-secret")
    spec = (TensorSpec("x", (64,), torch.bfloat16),)
    ch = AfdChannel(mesh, ChannelConfig(max_tokens=16, send=spec, recv=spec, num_microbatches=2))
    for layer in range(4):
        for mb in range(2):
            if ch.is_attention:
                ch.send(layer, mb, torch.ones(16, 64, dtype=torch.bfloat16))
                ch.recv(layer, mb)
            else:
                b = ch.recv_batch(layer, mb)
                ch.send_back(layer, mb, b.tensors[0])
    events = mesh.trace_events()
    mesh.close()
    return events


@pytest.mark.timeout(60)
def test_trace_spans_and_chrome_export(tmp_path) -> None:
    from afdkit.mesh import message_spans, write_chrome_trace

    per_rank = dict(enumerate(check_all_ok(run_ranks(_traced, ["attention", "ffn"], env=UCX_ENVS["shm"],
                                                      timeout_s=45))))
    spans = message_spans(per_rank)
    assert len(spans) == 4 * 2 * 2  # layers x microbatches x directions
    for s in spans:
        for k in ("posted", "delivered", "consumed"):
            assert k in s, s
        assert s["enqueue"] <= s["posted"] <= s["delivered"] <= s["consumed"], s
        assert s["src"] != s["dst"] and s["nbytes"] > 16 * 64 * 2
    assert {(s["direction"], s["layer"], s["microbatch"]) for s in spans} == {
        (d, layer, mb) for d in (0, 1) for layer in range(4) for mb in range(2)}
    path = tmp_path / "mesh.json"
    write_chrome_trace(str(path), per_rank, roles={0: "attention", 1: "ffn"})
    trace = json.loads(path.read_text())
    phases = {e["ph"] for e in trace["traceEvents"]}
    assert {"M", "X", "s", "f"} <= phases
