import re

import afdkit


def test_build_info_reports_the_build():
    info = afdkit.build_info()
    assert info["version"] == afdkit.__version__
    assert info["cuda_arch"] == "90a"
    assert re.fullmatch(r"\d+\.\d+\.\d+", info["nvcc_version"])
    assert info["build_type"] in {"Release", "RelWithDebInfo", "Debug"}
    assert isinstance(info["git_sha"], str) and info["git_sha"]
    assert info["cuda_runtime_version"] >= 12000
    assert info["cuda_device_count"] >= 0


def test_build_info_reports_ucx():
    ucx = afdkit.build_info()["ucx"]
    assert re.match(r"\d+\.\d+", ucx["runtime_version"])
    assert ucx["runtime_version"].startswith(ucx["build_version"])
    assert ucx["compatible"] is True and "error" not in ucx
    assert "libucp" in ucx["library"]  # the file the loader resolved, for diagnosing a wrong UCX
    # Every host has loopback TCP and shared memory: the CPU mesh tests rely on them.
    names = {t.split("/")[0] for t in ucx["transports"]}
    assert "tcp" in names
    assert names & {"posix", "sysv"}


def test_benchmark_records_hold_no_machine_paths(monkeypatch, tmp_path):
    # Records land in bench/results/ and are shared: file names, never this machine's layout.
    from afdkit.bench.common import environment

    out = tmp_path / "deep" / "bench.json"
    monkeypatch.setattr("sys.argv", [str(tmp_path / "bench_mfa.py"), "--out", str(out), "--batch", "8"])
    env = environment()
    assert env["command"] == "bench_mfa.py --out bench.json --batch 8"
    assert env["afdkit"]["ucx"]["library"].startswith("libucp")
    assert str(tmp_path) not in repr(env)
