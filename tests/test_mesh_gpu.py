"""GPU-to-GPU transfers of the mesh (needs 2 GPUs of one host): the ``ipc`` backend
(CUDA IPC + copy engines + stream write-value) and UCX ``cuda_ipc`` (posted by the
progress thread after the stream reaches the put), with stream-ordered waits
(cuStreamWaitValue64) and content checks; and the AFD channel on CUDA."""

from __future__ import annotations

import pytest
import torch

from afdkit.mesh.testing import RankContext, check_all_ok, run_ranks

pytestmark = [pytest.mark.gpu, pytest.mark.multiproc]

UCX_CUDA_ENV = {"UCX_TLS": "cuda_ipc,cuda_copy,tcp", "UCX_NET_DEVICES": "lo"}


def _need_two_gpus() -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs of one host")


def _gpu_pingpong(ctx: RankContext) -> dict:
    from afdkit.mesh import Mesh, MeshConfig

    dev = torch.device("cuda", ctx.rank)
    torch.cuda.set_device(dev)
    use_ipc = ctx.args["backend"] == "ipc"
    # device=None keeps the engine from mapping peers' memory: every put goes through UCX.
    m = Mesh(ctx.rank, ctx.world_size, ctx.role,
             MeshConfig(mesh_id=f"gpu-{ctx.args['backend']}", timeout_s=20, device=ctx.rank if use_ipc else None))
    buf = m.alloc("buf", 8 << 20, dev)
    sig = m.alloc("sig", 256, dev)
    m.connect(ctx.store(), b"gpu-secret")
    peer = 1 - ctx.rank
    backend = m.remote(peer, "buf").backend
    stream = torch.cuda.current_stream().cuda_stream
    g = torch.Generator(device=dev).manual_seed(11)
    sizes = torch.Generator().manual_seed(5)
    checked = 0
    for i in range(1, 41):
        n = int(torch.randint(1, 8 << 20, (1,), generator=sizes).item()) if i % 4 else 8 << 20
        data = torch.randint(0, 256, (n,), dtype=torch.uint8, device=dev, generator=g)
        if (i % 2 == 1) == (ctx.rank == 0):
            # stream 0 (torch's default stream) orders the put too: it must not race randint.
            m.put(data, peer, "buf", signal=("sig", 0, i), stream=stream)
        else:
            m.wait_stream("sig", 0, i, stream, peer=peer)  # the copy below runs only after the data landed
            got = buf[:n].clone()
            torch.cuda.current_stream().synchronize()
            m.check(peer)  # MeshTimeout here (not a hang) if the watchdog had to release the stream
            assert torch.equal(got, data), f"message {i} differs"
            if i % 8 == 0:
                m.wait("sig", 0, i, peer=peer)  # the host-blocking flavour on a GPU word
            checked += 1
    torch.cuda.synchronize()
    m.flush()
    m.close()
    return {"backend": backend, "checked": checked, "sig": int(sig[:8].view(torch.int64).item())}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["ipc", "ucx"])
def test_gpu_put_signal(backend: str) -> None:
    _need_two_gpus()
    env = {} if backend == "ipc" else UCX_CUDA_ENV
    vals = check_all_ok(run_ranks(_gpu_pingpong, ["attention", "ffn"], args={"backend": backend}, env=env,
                                  timeout_s=100))
    for v in vals:
        assert v["backend"] == backend, v
        assert v["checked"] == 20


def _stream_wait_timeout(ctx: RankContext) -> str:
    from afdkit.mesh import Mesh, MeshConfig, MeshTimeout

    dev = torch.device("cuda", ctx.rank)
    torch.cuda.set_device(dev)
    m = Mesh(ctx.rank, ctx.world_size, ctx.role, MeshConfig(mesh_id="gpu-watchdog", timeout_s=20, device=ctx.rank))
    m.alloc("sig", 64, dev)
    m.connect(ctx.store(), b"gpu-secret")
    msg = ""
    if ctx.rank == 0:  # waits for a signal that nobody sends: the watchdog must release the stream
        stream = torch.cuda.current_stream()
        m.wait_stream("sig", 0, 7, stream.cuda_stream, timeout_s=0.5, peer=1, what="a signal never sent")
        stream.synchronize()  # returns: the watchdog released the stream
        try:
            m.check(1)
        except MeshTimeout as exc:
            msg = str(exc)
    ctx.store().set(f"done{ctx.rank}", "1")
    ctx.store().wait([f"done{1 - ctx.rank}"])
    m.close()
    return msg


@pytest.mark.timeout(120)
def test_gpu_stream_wait_times_out() -> None:
    _need_two_gpus()
    vals = check_all_ok(run_ranks(_stream_wait_timeout, ["attention", "ffn"], timeout_s=100))
    assert "a signal never sent" in vals[0] and "timed out" in vals[0], vals[0]


def _gpu_channel(ctx: RankContext) -> bool:
    from afdkit.mesh import AfdChannel, ChannelConfig, Mesh, MeshConfig, TensorSpec

    dev = torch.device("cuda", ctx.rank)
    torch.cuda.set_device(dev)
    m = Mesh(ctx.rank, ctx.world_size, ctx.role, MeshConfig(mesh_id="gpu-channel", timeout_s=20, device=ctx.rank))
    m.connect(ctx.store(), b"gpu-secret")
    send = (TensorSpec("u", (7168,), torch.float8_e4m3fn), TensorSpec("scale", (1,), torch.float32))
    recv = (TensorSpec("y", (7168,), torch.bfloat16),)
    ch = AfdChannel(m, ChannelConfig(max_tokens=128, send=send, recv=recv, device=str(dev)))
    g = torch.Generator(device=dev).manual_seed(3)
    for layer in range(6):
        for mb in range(3):
            if ch.is_attention:
                x = torch.randn(128, 7168, device=dev, generator=g)
                u = x.to(torch.float8_e4m3fn)
                ch.send(layer, mb, (u, torch.ones(128, 1, device=dev)))
                y = ch.recv(layer, mb)
                assert torch.equal(y, (u.float() * 2).to(torch.bfloat16)), (layer, mb)
            else:
                b = ch.recv_batch(layer, mb)
                ch.send_back(layer, mb, (b.tensors[0].float() * 2).to(torch.bfloat16))
    torch.cuda.synchronize()
    m.close()
    return True


@pytest.mark.timeout(120)
def test_gpu_channel_1a1f() -> None:
    _need_two_gpus()
    check_all_ok(run_ranks(_gpu_channel, ["attention", "ffn"], timeout_s=100))
