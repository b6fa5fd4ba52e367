"""The AFD runtime end to end on CPU over UCX (loopback only): greedy tokens of 1A1F,
2A2F (broadcast and routed), 1A3F and (in the torchrun test) 2A1F equal the colocated
reference; per-stage timing is
recorded; a killed worker or Ctrl-C ends every process with a message naming what
failed, within the mesh timeout, leaving no process behind; torchrun-style launch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from afdkit.runtime import report
from afdkit.runtime.config import RunConfig
from afdkit.runtime.launch import launch_local
from afdkit.runtime.rank import reference_tokens

pytestmark = pytest.mark.multiproc

# 2A1F broadcast is checked by the demo (tests/test_cli.py) and the torchrun test below.
CASES = {  # (attention, ffn, routing, transport)
    "1A1F-broadcast": (1, 1, "broadcast", "shm"),
    "2A2F-broadcast": (2, 2, "broadcast", "tcp"),
    "2A2F-routed": (2, 2, "routed", "shm"),
    "1A3F-routed": (1, 3, "routed", "tcp"),
}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", sorted(CASES))
def test_afd_tokens_equal_colocated(case: str) -> None:
    att, ffn, routing, transport = CASES[case]
    # 7 sequences: uneven over 2 attention ranks and 3 microbatches (one microbatch of
    # rank 1 holds a single sequence); the 3-FFN case splits widths unevenly.
    cfg = RunConfig(attention=att, ffn=ffn, routing=routing, transport=transport, batch=7, context=11, steps=4,
                    seed=4, timeout_s=30)
    outcome = launch_local(cfg)
    assert outcome.ok, outcome.failure_message()
    got = report.tokens_by_sequence(outcome.results)
    want = reference_tokens(cfg)
    assert sorted(got) == list(range(7))
    assert got == want
    # Every worker timed every (layer, microbatch) of its stages.
    L = cfg.model_config().num_hidden_layers
    for rank, r in outcome.results.items():
        stages = {"attention", "send", "wait"} if r["role"] == "attention" else {"recv", "ffn", "send_back"}
        for stage in stages:
            seen = {(s[1], s[2]) for s in r["spans"] if s[0] == stage}
            assert seen == {(layer, mb) for layer in range(L) for mb in range(3)}, (rank, stage)
        assert len(r["step_ends_ns"]) == cfg.steps
    s = report.summarize(cfg, outcome.results)
    assert s.tokens == 7 * 3 and s.tokens_per_s > 0 and 0 < s.tpot_p50_ms <= s.tpot_p99_ms
    assert 0 < s.transfer_share < 1 and s.a2f_us > 0 and s.f2a_us > 0


def test_split_tokens_differ_from_a_different_split() -> None:
    """The reference is sensitive to the wire numerics it emulates (so the equality
    above is not vacuous): 1 and 2 FFN shards give different partial roundings, and
    over enough sequences at least one token differs or the logits do."""
    from afdkit.models.step3 import Step3Config
    from afdkit.runtime.checkpoint import RandomSource
    from afdkit.runtime.numerics import Numerics
    from afdkit.runtime.worker import AttentionWorker, LocalFFN, colocated_shards

    config, cpu = Step3Config.tiny(), Numerics.for_device("cpu")
    src = RandomSource(config, 4)
    logits = []
    for n in (1, 2):
        w = AttentionWorker(config, src, cpu, list(range(4)), context=11, steps=2, num_microbatches=1, num_ffn=n,
                            seed=4)
        logits.append(w.run(LocalFFN(colocated_shards(config, src, cpu, "broadcast", n)), keep_logits=True).logits)
    assert not (logits[0] == logits[1]).all()


def _as_foreground_job() -> None:
    """In the child before exec: SIGINT at its default, as a terminal's foreground job
    has it. A test runner started in the background of a non-interactive shell passes
    SIGINT on ignored, and a launcher that inherits it ignored rightly ignores Ctrl-C:
    without this the Ctrl-C test failed whenever the suite was run that way."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_cli(args: list[str], tmp_path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "afdkit.cli", "run", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path, start_new_session=True,
                            preexec_fn=_as_foreground_job)


def _pids_and_first_step(proc: subprocess.Popen, deadline_s: float) -> tuple[dict[int, int], list[str]]:
    """Reads the launcher's 'rank r (role) pid p' line and waits for its first progress line."""
    pids: dict[int, int] = {}
    lines = []
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if " pid " in line and not pids:
            for part in line.split(":", 1)[1].split(","):
                words = part.split()
                pids[int(words[1])] = int(words[-1])
        if pids and "step " in line:
            return pids, lines
    raise AssertionError(f"the run did not start within {deadline_s} s: {lines}")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("victim", [2])  # the FFN rank: both attention ranks are blocked on it
def test_killed_worker_ends_the_run(victim: int, tmp_path) -> None:
    timeout_s = 8
    proc = _start_cli(["--attention", "2", "--ffn", "1", "--steps", "400", "--batch", "4", "--context", "4",
                       "--layers", "3", "--timeout", str(timeout_s)], tmp_path)
    try:
        pids, _ = _pids_and_first_step(proc, 60)
        os.kill(pids[victim], signal.SIGKILL)
        t_kill = time.monotonic()
        out, err = proc.communicate(timeout=timeout_s + 30)
        elapsed = time.monotonic() - t_kill
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    role = "ffn" if victim == 2 else "attention"
    assert proc.returncode == 1, (out, err)
    first = err.strip().splitlines()[0]
    assert f"rank {victim} ({role}) was killed by SIGKILL" in first, err
    assert "MeshPeerLost" in err or "MeshTimeout" in err, err  # the survivors' own errors follow
    assert elapsed < timeout_s + 10, elapsed
    time.sleep(0.5)
    assert not [p for p in pids.values() if _alive(p)], "a worker outlived the run"


@pytest.mark.timeout(120)
def test_ctrl_c_stops_every_worker(tmp_path) -> None:
    proc = _start_cli(["--attention", "1", "--ffn", "2", "--steps", "400", "--batch", "3", "--context", "4",
                       "--layers", "3", "--routing", "routed"], tmp_path)
    try:
        pids, _ = _pids_and_first_step(proc, 60)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole group
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, (out, err)
    assert "interrupted (Ctrl-C)" in err
    time.sleep(0.5)
    assert not [p for p in pids.values() if _alive(p)], "a worker outlived the run"


@pytest.mark.timeout(120)
def test_torchrun_style_launch(tmp_path) -> None:
    """Three processes started like torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT, LOCAL_RANK): rank 0 gathers every result and prints the table."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["--attention", "2", "--ffn", "1", "--batch", "5", "--steps", "3", "--context", "6", "--json",
            str(tmp_path / "rows.json"), "--check"]
    procs = []
    for rank in range(3):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="3", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), AFDKIT_SECRET="test-secret", TORCHELASTIC_RUN_ID="t1",
                   UCX_TLS="tcp", UCX_NET_DEVICES="lo")
        procs.append(subprocess.Popen([sys.executable, "-m", "afdkit.cli", "run", *args], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=100))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    assert "2A1F broadcast" in outs[0][0] and "equal the colocated reference" in outs[0][0]
    assert "tokens/s" not in outs[1][0]  # only rank 0 reports
    assert (tmp_path / "rows.json").exists()


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(120)
def test_embedding_example_runs() -> None:
    """docs/embedding.md's example: routed connector, 1 attention + 2 FFN ranks, exact results."""
    res = subprocess.run([sys.executable, os.path.join(REPO, "examples", "embedding_connector.py"), "--layers", "3"],
                         capture_output=True, text=True, timeout=100)
    assert res.returncode == 0, res.stderr
    assert "ok: 3 layers x 3 stages, 2 FFN ranks, results exact" in res.stdout


def _connector_misuse(ctx) -> list[str]:
    import torch

    from afdkit.mesh import Mesh, MeshConfig
    from afdkit.runtime.connector import AfdConnector, AfdMetadata, ConnectorConfig

    mesh = Mesh(ctx.rank, ctx.world_size, ctx.role, MeshConfig(mesh_id="misuse", timeout_s=20))
    mesh.connect(ctx.store(), b"s")
    conn = AfdConnector(mesh, ConnectorConfig(hidden_size=128, top_k=2, max_tokens=4, num_stages=2, mode="routed",
                                              expert_owner=(0, 0, 0, 0)))
    meta = AfdMetadata(0, 0)
    u = torch.randn(3, 128)
    ids, w = torch.zeros(3, 2, dtype=torch.int32), torch.rand(3, 2)
    if conn.is_attention:
        cases = [lambda: conn.recv_attn_output(0, 0), lambda: conn.send_ffn_output(u, None),
                 lambda: conn.send_attn_output(torch.randn(3, 64), meta),
                 lambda: conn.send_attn_output(u, meta, topk_ids=ids),
                 lambda: conn.send_attn_output(u, meta, topk_ids=ids[:, :1], topk_weights=w[:, :1]),
                 lambda: conn.send_attn_output(torch.randn(5, 128), meta),  # over max_tokens
                 lambda: conn.send_attn_output(u, meta, topk_ids=ids + 4, topk_weights=w),  # unknown expert
                 lambda: conn.send_attn_output(u, AfdMetadata(0, 2)),  # unknown stage
                 lambda: conn.recv_ffn_output(type("H", (), {"metadata": meta})())]  # nothing sent
    else:
        cases = [lambda: conn.send_attn_output(u, meta), lambda: conn.recv_ffn_output(None)]
    out = []
    for case in cases:
        try:
            case()
            out.append("no error")
        except (ValueError, TypeError, RuntimeError) as exc:
            out.append(type(exc).__name__)
    # The connector still works after refused calls: one routed exchange, checked.
    if conn.is_attention:
        h = conn.send_attn_output(u, meta, topk_ids=ids, topk_weights=w)
        y = conn.recv_ffn_output(h)  # the FFN echoes u as it received it (FP8 on the wire)
        from afdkit.runtime.numerics import wire_decode, wire_encode

        assert torch.equal(y, wire_decode(*wire_encode(u), torch.float32).bfloat16())
        assert y.shape == (3, 128) and y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    else:
        req = conn.recv_attn_output(0, 0)
        assert req.num_tokens == 3 and req.home.all()
        assert torch.equal(req.topk_ids, torch.zeros(3, 2, dtype=torch.int32))
        try:
            conn.send_ffn_output(torch.zeros(2, 128), req)
            out.append("no error")
        except ValueError:
            out.append("ValueError")
        conn.send_ffn_output(req.hidden(torch.float32), req)
    mesh.close()
    return out


@pytest.mark.timeout(90)
def test_connector_refuses_misuse() -> None:
    from afdkit.mesh.testing import UCX_ENVS, check_all_ok, run_ranks
    from afdkit.runtime.connector import ConnectorConfig

    vals = check_all_ok(run_ranks(_connector_misuse, ["attention", "ffn"], env=UCX_ENVS["shm"], timeout_s=60))
    assert vals[0] == ["RuntimeError", "RuntimeError"] + ["ValueError"] * 7, vals[0]
    assert vals[1] == ["RuntimeError", "RuntimeError", "ValueError"], vals[1]
    with pytest.raises(ValueError, match="multiple of 128"):
        ConnectorConfig(hidden_size=100, top_k=1, max_tokens=1)
    with pytest.raises(ValueError, match="expert_owner"):
        ConnectorConfig(hidden_size=128, top_k=1, max_tokens=1, mode="routed")
