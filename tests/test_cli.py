"""The afdkit command line: the AFD demo runs and checks its tokens, run writes its
results, info prints JSON, bench dispatches, bad arguments are usage errors (exit 2)."""

import json
from pathlib import Path

import pytest

from afdkit import cli

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.multiproc
@pytest.mark.timeout(180)
def test_demo_decodes_and_prints_the_table(capsys, tmp_path):
    assert cli.main(["demo", "--batch", "2", "--steps", "3", "--prompt-len", "4", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "colocated" in out and "tokens/s" in out
    assert out.count("seq ") == 2
    assert "2A1F broadcast" in out and "equal the colocated reference" in out
    for name in ("afd-trace.json", "colocated-trace.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    try:  # the timeline PNG needs matplotlib; without it the demo must say so
        import matplotlib  # noqa: F401
    except ImportError:
        assert not (tmp_path / "afd-timeline.png").exists()
        assert "matplotlib is not installed" in out
    else:
        assert (tmp_path / "afd-timeline.png").stat().st_size > 0
    trace = json.loads((tmp_path / "afd-trace.json").read_text())
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert any(n.startswith("attention L0 mb0") for n in names) and any(n.startswith("ffn L5") for n in names)
    assert any(n.startswith("send A->F") for n in names)  # the mesh's messages are in it too


@pytest.mark.multiproc
@pytest.mark.timeout(180)
def test_demo_is_deterministic_for_a_seed(capsys, tmp_path):
    argv = ["demo", "--batch", "3", "--steps", "4", "--seed", "3", "--no-compare", "--out", str(tmp_path)]
    cli.main(argv)
    first = [l for l in capsys.readouterr().out.splitlines() if l.strip().startswith("seq")]
    cli.main(argv)
    second = [l for l in capsys.readouterr().out.splitlines() if l.strip().startswith("seq")]
    assert first == second and len(first) == 3


@pytest.mark.multiproc
@pytest.mark.timeout(180)
def test_run_compare_writes_both_rows(capsys, tmp_path):
    rows = tmp_path / "rows.json"
    argv = ["run", "--attention", "1", "--ffn", "1", "--layers", "2", "--batch", "2", "--steps", "3", "--context", "3",
            "--routing", "routed", "--compare", "--check", "--json", str(rows)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "equal the colocated reference" in out
    data = json.loads(rows.read_text())
    assert [r["mode"] for r in data["rows"]] == ["afd", "colocated"]
    assert all(r["tokens"] == 2 * 2 and r["tokens_per_s"] > 0 for r in data["rows"])
    assert data["configs"][0]["routing"] == "routed" and data["configs"][1]["colocated"]


def test_info_prints_build_json(capsys):
    assert cli.main(["info"]) == 0
    assert json.loads(capsys.readouterr().out)["cuda_arch"] == "90a"


def test_bench_dispatches_to_the_mesh_script(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert cli.main(["bench", "mesh", "--help"]) == 0
    assert "ucx_perftest" in capsys.readouterr().out


def test_bench_runtime_needs_a_gpu(monkeypatch, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has a GPU")
    monkeypatch.chdir(REPO)
    assert cli.main(["bench", "runtime"]) == 2
    assert "needs" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [
    [], ["demo", "--steps", "0"], ["demo", "--batch", "x"], ["bench", "gpt"], ["demo", "--kv-dtype", "int4"],
    ["demo", "--microbatches", "0"], ["demo", "--batch", "1"], ["demo", "--device", "tpu"],
    ["run"], ["run", "--attention", "1"], ["run", "--attention", "0", "--ffn", "1"],
    ["run", "--attention", "1", "--ffn", "1", "--routing", "sideways"],
    ["run", "--attention", "2", "--ffn", "1", "--batch", "1"],
    ["run", "--attention", "1", "--ffn", "1", "--model", "huge"],
    ["run", "--attention", "1", "--ffn", "1", "--steps", "3", "--warmup-steps", "3"],
    ["run", "--attention", "1", "--ffn", "200"],
    ["run", "--attention", "1", "--ffn", "9", "--routing", "routed"],
    ["run", "--attention", "1", "--ffn", "1", "--layers", "0"],
    ["run", "--attention", "1", "--ffn", "1", "--context", "-1"],
    ["run", "--attention", "1", "--ffn", "1", "--context", "5000"],
    ["run", "--attention", "1", "--ffn", "1", "--timeout", "0"],
    ["run", "--attention", "1", "--ffn", "1", "--device", "gpu"],
])
def test_bad_arguments_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert "usage: afdkit" in capsys.readouterr().err


@pytest.mark.multiproc
@pytest.mark.timeout(180)
def test_run_from_a_checkpoint_equals_seeded_weights(capsys, tmp_path):
    """A safetensors checkpoint of the seeded weights decodes to the tokens of the
    seeded run (computed here by the in-process colocated model)."""
    from afdkit.models.step3 import Step3Weights
    from afdkit.runtime.checkpoint import save_safetensors
    from afdkit.runtime.config import RunConfig
    from afdkit.runtime.rank import reference_tokens

    cfg = RunConfig(attention=1, ffn=2, batch=3, steps=3, context=5, seed=7, routing="routed")
    save_safetensors(Step3Weights.random(cfg.model_config(), seed=7), tmp_path / "ckpt", max_shard_bytes=4 << 20)
    want = reference_tokens(cfg)  # seeded random weights, no checkpoint
    argv = ["run", "--attention", "1", "--ffn", "2", "--batch", "3", "--steps", "3", "--context", "5", "--seed", "7",
            "--routing", "routed", "--checkpoint", str(tmp_path / "ckpt")]
    assert cli.main(argv) == 0
    lines = [l.strip() for l in capsys.readouterr().out.splitlines() if l.strip().startswith("seq ")]
    assert lines == [f"seq {s}: {want[s]}" for s in range(3)]
