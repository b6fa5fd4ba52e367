"""The stream-ordered AFD channel on GPUs (flags, copy engines, no host waits).

Needs 2 GPUs of one host (the 2A2F cases 4): ``python3 -m pytest -q tests/test_mesh_gpu_stream.py``.

- content checks of send/recv, recv_batch and recv_batch_device/send_back, broadcast and
  routed, 1A1F and 2A2F, over ipc; a channel with UCX peers is refused with a clear error;
- the host is not blocked: recv() returns while the FFN still sleeps;
- CUDA-graph capture and replay of a whole round trip on both sides;
- a stream wait that never gets its data ends in MeshTimeout (watchdog), never a hang;
- the torch profiler sees no kernel launched by the transport in a round trip.
"""

from __future__ import annotations

import time

import pytest
import torch

from afdkit.mesh.testing import RankContext, check_all_ok, run_ranks

pytestmark = [pytest.mark.gpu, pytest.mark.multiproc]

HIDDEN = 512
MAX_TOKENS = 64
UCX_CUDA_ENV = {"UCX_TLS": "cuda_ipc,cuda_copy,tcp", "UCX_NET_DEVICES": "lo"}


def _need_gpus(n: int) -> None:
    if torch.cuda.device_count() < n:
        pytest.skip(f"needs {n} GPUs of one host")


def _open(ctx: RankContext, mesh_id: str, mode: str = "broadcast", channel_timeout_s: float | None = None,
          ipc: bool = True):
    from afdkit.mesh import AfdChannel, ChannelConfig, Mesh, MeshConfig, TensorSpec

    dev = torch.device("cuda", ctx.rank)
    torch.cuda.set_device(dev)
    m = Mesh(ctx.rank, ctx.world_size, ctx.role,
             MeshConfig(mesh_id=mesh_id, timeout_s=30.0, device=ctx.rank if ipc else None))
    m.connect(ctx.store(), b"gpu-secret")
    send = (TensorSpec("u", (HIDDEN,), torch.float8_e4m3fn), TensorSpec("scale", (1,), torch.float32))
    recv = (TensorSpec("y", (HIDDEN,), torch.bfloat16),)
    n_ffn = ctx.roles.count("ffn")
    cfg = ChannelConfig(max_tokens=MAX_TOKENS, send=send, recv=recv, mode=mode, device=str(dev),
                        expert_map=tuple(e % n_ffn for e in range(8)), num_microbatches=3,
                        timeout_s=channel_timeout_s, stream_ordered=True)
    ch = AfdChannel(m, cfg)
    assert ch.stream_ordered
    return m, ch, dev


def _inputs(a: int, layer: int, mb: int, dev: torch.device, n_ffn: int):
    """Attention rank a's rows for (layer, mb): random count (0 allowed), values, experts."""
    g = torch.Generator(device="cpu").manual_seed((a * 1009 + layer) * 17 + mb)
    n = int(torch.randint(0, MAX_TOKENS + 1, (1,), generator=g))
    u = (torch.randn(n, HIDDEN, generator=g) * 4).to(torch.float8_e4m3fn).to(dev)
    scale = (torch.rand(n, 1, generator=g) + 0.5).to(dev)
    experts = torch.randint(0, 8, (n, 2), generator=g).to(dev)
    return u, scale, experts


def _ffn_result(u: torch.Tensor, scale: torch.Tensor, f: int) -> torch.Tensor:
    return (u.float() * scale * (f + 1)).to(torch.bfloat16)  # exact per FFN index; the sum is checked in fp32


def _expected(u, scale, experts, n_ffn: int, mode: str) -> torch.Tensor:
    acc = torch.zeros(u.shape[0], HIDDEN, dtype=torch.float32, device=u.device)
    emap = torch.tensor([e % n_ffn for e in range(8)], device=u.device)
    for f in range(n_ffn):
        rows = torch.ones(u.shape[0], dtype=torch.bool, device=u.device) if mode == "broadcast" else \
            (emap[experts] == f).any(1)
        acc[rows] += _ffn_result(u[rows], scale[rows], f).float()
    return acc.to(torch.bfloat16)


def _round_trips(ctx: RankContext) -> dict:
    mode, layers = ctx.args["mode"], ctx.args["layers"]
    m, ch, dev = _open(ctx, f"stream-{mode}-{ctx.world_size}", mode, ipc=ctx.args["ipc"])
    n_ffn = len(ch.ffn)
    checked = 0
    for layer in range(layers):
        if ch.is_attention:
            a = ch.att.index(ctx.rank)
            sent = {}
            for mb in range(3):
                u, scale, experts = _inputs(a, layer, mb, dev, n_ffn)
                ch.send(layer, mb, (u, scale), routing=experts if mode == "routed" else None)
                sent[mb] = (u, scale, experts)
            for mb in range(3):
                y = ch.recv(layer, mb)
                want = _expected(*sent[mb], n_ffn, mode)
                torch.cuda.current_stream().synchronize()
                m.check()
                assert torch.equal(y, want), f"rank {ctx.rank} layer {layer} mb {mb}"
                checked += 1
        else:
            f = ch.ffn.index(ctx.rank)
            for mb in range(3):
                if (layer + mb) % 2 == 0:  # the Batch API: exact rows, one host sync
                    b = ch.recv_batch(layer, mb)
                    start = 0
                    for ai, a in enumerate(ch.att):
                        u, scale, experts = _inputs(a, layer, mb, dev, n_ffn)
                        if mode == "routed":
                            emap = torch.tensor([e % n_ffn for e in range(8)], device=dev)
                            rows = (emap[experts] == f).any(1).nonzero().flatten()
                            u, scale = u[rows], scale[rows]
                            assert torch.equal(b.row_index[ai], rows)
                        cnt = b.counts[ai]
                        assert cnt == u.shape[0], (layer, mb, a, cnt)
                        assert torch.equal(b.tensors[0][start : start + cnt].view(torch.uint8), u.view(torch.uint8))
                        assert torch.equal(b.tensors[1][start : start + cnt], scale)
                        start += cnt
                    ch.send_back(layer, mb, _ffn_result(b.tensors[0], b.tensors[1], f))
                else:  # fixed-size views with device-side counts, no host sync
                    d = ch.recv_batch_device(layer, mb)
                    assert d.tensors[0].shape == (len(ch.att), MAX_TOKENS, HIDDEN)
                    y = _ffn_result(d.tensors[0], d.tensors[1], f)  # all slot rows; stale rows are ignored
                    counts = d.counts.clone()  # before send_back frees the slots for the next message
                    ch.send_back(layer, mb, y)
                    counts = counts.cpu().tolist()
                    for ai, a in enumerate(ch.att):
                        u, _, experts = _inputs(a, layer, mb, dev, n_ffn)
                        if mode == "routed":
                            emap = torch.tensor([e % n_ffn for e in range(8)], device=dev)
                            u = u[(emap[experts] == f).any(1)]
                        assert counts[ai] == u.shape[0], (layer, mb, a, counts)
                checked += 1
    torch.cuda.synchronize()
    assert ch.pending() == {"sent": 0, "batches": 0}
    m.check()
    m.close()
    return {"checked": checked, "graph_safe": ch.graph_safe}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["broadcast", "routed"])
@pytest.mark.parametrize("topology", ["1A1F", "2A2F"])
def test_stream_channel_round_trips(topology: str, mode: str) -> None:
    n_att, n_ffn = {"1A1F": (1, 1), "2A2F": (2, 2)}[topology]
    _need_gpus(n_att + n_ffn)
    roles = ["attention"] * n_att + ["ffn"] * n_ffn
    vals = check_all_ok(run_ranks(_round_trips, roles, args={"mode": mode, "layers": 8, "ipc": True}, timeout_s=160))
    for v in vals:
        assert v["checked"] == 24
        assert v["graph_safe"], v


def _refuses_ucx(ctx: RankContext) -> str:
    from afdkit.mesh import MeshError

    try:
        m, ch, dev = _open(ctx, "stream-ucx", ipc=False)
    except MeshError as exc:
        return str(exc)
    m.close()
    return "accepted"


@pytest.mark.timeout(120)
def test_stream_channel_refuses_ucx_peers() -> None:
    _need_gpus(2)
    for msg in check_all_ok(run_ranks(_refuses_ucx, ["attention", "ffn"], env=UCX_CUDA_ENV, timeout_s=100)):
        assert "needs every peer over CUDA IPC" in msg and "over UCX" in msg, msg


def _host_not_blocked(ctx: RankContext) -> float:
    m, ch, dev = _open(ctx, "stream-async")
    delay = 1.0
    if ch.is_attention:
        u = torch.ones(MAX_TOKENS, HIDDEN, device=dev).to(torch.float8_e4m3fn)
        s = torch.ones(MAX_TOKENS, 1, device=dev)
        t0 = time.monotonic()
        ch.send(0, 0, (u, s))
        y = ch.recv(0, 0)  # queued on the stream: must return long before the FFN answers
        host_s = time.monotonic() - t0
        torch.cuda.current_stream().synchronize()
        m.check()
        assert torch.equal(y, torch.ones_like(y)), "results differ"
        assert time.monotonic() - t0 >= delay * 0.5, "the stream did not wait for the results"
    else:
        b = ch.recv_batch_device(0, 0)
        time.sleep(delay)
        ch.send_back(0, 0, _ffn_result(b.tensors[0], b.tensors[1], 0))
        torch.cuda.synchronize()
        host_s = 0.0
    m.close()
    return host_s


@pytest.mark.timeout(120)
def test_stream_channel_host_not_blocked() -> None:
    _need_gpus(2)
    host_s = check_all_ok(run_ranks(_host_not_blocked, ["attention", "ffn"], timeout_s=100))[0]
    assert host_s < 0.2, f"send + recv blocked the host for {host_s:.3f} s"


def _graph(ctx: RankContext) -> int:
    m, ch, dev = _open(ctx, "stream-graph")
    assert ch.graph_safe
    u = torch.zeros(MAX_TOKENS, HIDDEN, device=dev).to(torch.float8_e4m3fn)
    s = torch.zeros(MAX_TOKENS, 1, device=dev)
    side = torch.cuda.Stream(dev)
    g = torch.cuda.CUDAGraph()
    replays = 20
    with torch.cuda.stream(side):
        if ch.is_attention:
            ch.send(0, 1, (u, s))  # one eager round trip on the capture stream first
            ch.recv(0, 1)
            with torch.cuda.graph(g, stream=side, capture_error_mode="thread_local"):
                ch.send(1, 1, (u, s))
                y = ch.recv(1, 1)
        else:
            b = ch.recv_batch_device(0, 1)
            ch.send_back(0, 1, _ffn_result(b.tensors[0], b.tensors[1], 0))
            with torch.cuda.graph(g, stream=side, capture_error_mode="thread_local"):
                b = ch.recv_batch_device(1, 1)
                ch.send_back(1, 1, _ffn_result(b.tensors[0], b.tensors[1], 0))
    torch.cuda.synchronize()
    gen = torch.Generator(device="cpu").manual_seed(ctx.rank + 7)
    for i in range(replays):
        if ch.is_attention:
            x = (torch.randn(MAX_TOKENS, HIDDEN, generator=gen) * 3).to(dev)
            u.copy_(x.to(torch.float8_e4m3fn))
            s.copy_((torch.rand(MAX_TOKENS, 1, generator=gen) + 0.5).to(dev))
            torch.cuda.synchronize()
            g.replay()
            torch.cuda.synchronize()
            m.check()
            assert torch.equal(y, _ffn_result(u, s, 0)), f"replay {i}"
        else:
            g.replay()
    torch.cuda.synchronize()
    m.check()
    m.close()
    return replays


@pytest.mark.timeout(120)
def test_stream_channel_cuda_graph_replay() -> None:
    _need_gpus(2)
    assert check_all_ok(run_ranks(_graph, ["attention", "ffn"], timeout_s=100)) == [20, 20]


def _watchdog(ctx: RankContext) -> str:
    from afdkit.mesh import MeshTimeout

    m, ch, dev = _open(ctx, "stream-watchdog", channel_timeout_s=1.0)
    msg = ""
    if ch.is_attention:
        u = torch.ones(4, HIDDEN, device=dev).to(torch.float8_e4m3fn)
        ch.send(3, 2, (u, torch.ones(4, 1, device=dev)))
        ch.recv(3, 2)  # the FFN never answers
        t0 = time.monotonic()
        torch.cuda.current_stream().synchronize()  # returns: the watchdog released the stream
        waited = time.monotonic() - t0
        try:
            m.check()
        except MeshTimeout as exc:
            msg = f"{exc} (waited {waited:.2f})"
        try:
            ch.send(4, 0, (u, torch.ones(4, 1, device=dev)))
            msg += " | send went on"
        except MeshTimeout:
            msg += " | send raised MeshTimeout"
    ctx.store().set(f"done{ctx.rank}", "1")
    ctx.store().wait([f"done{1 - ctx.rank}"])
    m.close()
    return msg


@pytest.mark.timeout(120)
def test_stream_channel_watchdog_timeout() -> None:
    _need_gpus(2)
    msg = check_all_ok(run_ranks(_watchdog, ["attention", "ffn"], timeout_s=100))[0]
    assert "timed out" in msg and "microbatch 2" in msg and "layer 3" in msg and "rank 1" in msg, msg
    assert msg.endswith("send raised MeshTimeout"), msg


def _profiled(ctx: RankContext) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    m, ch, dev = _open(ctx, "stream-profile")
    u = torch.ones(MAX_TOKENS, HIDDEN, device=dev).to(torch.float8_e4m3fn)
    s = torch.ones(MAX_TOKENS, 1, device=dev)
    y = torch.ones(1, MAX_TOKENS, HIDDEN, device=dev, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for layer in range(4):
            if ch.is_attention:
                ch.send(layer, 0, (u, s))
                ch.recv(layer, 0, reduce="views")  # views: no reduction kernel of ours either
            else:
                ch.recv_batch_device(layer, 0)
                ch.send_back(layer, 0, y)
        torch.cuda.synchronize()
    m.check()
    kernels = sorted({e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                      and not e.name.lower().startswith(("memcpy", "memset"))})
    copies = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                 and e.name.lower().startswith("memcpy"))
    m.close()
    assert copies > 0 or not ch.is_attention, "the profiler saw no copy at all: is CUPTI working?"
    return kernels


@pytest.mark.timeout(120)
def test_stream_channel_launches_no_kernel() -> None:
    _need_gpus(2)
    vals = check_all_ok(run_ranks(_profiled, ["attention", "ffn"], timeout_s=100))
    assert vals == [[], []], f"kernels launched during the round trips: {vals}"
