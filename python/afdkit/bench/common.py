"""What every benchmark records next to its numbers: device, date, commit, command."""

from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
import sys
from typing import Any, Callable


def _no_machine_path(arg: str) -> str:
    """A file name instead of an absolute path: records are shared, the machine's layout is not."""
    return os.path.basename(arg) if os.path.isabs(arg) else arg


def environment() -> dict[str, Any]:
    import torch

    import afdkit

    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.argv[0])] + [_no_machine_path(a) for a in sys.argv[1:]]),
        "torch": torch.__version__,
    }
    try:
        info["afdkit"] = afdkit.build_info()
        info["commit"] = info["afdkit"]["git_sha"]
        ucx = info["afdkit"].get("ucx")
        if isinstance(ucx, dict) and isinstance(ucx.get("library"), str):
            ucx["library"] = _no_machine_path(ucx["library"])
    except ImportError:
        info["commit"] = "unknown"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["device"] = f"{p.name}, {p.total_memory >> 30} GiB, {p.multi_processor_count} SMs"
        try:
            info["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20,
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
    return info


def run_gpu_bench(name: str, args: Any, header: str, run: Callable[[], dict[str, Any]], footer: str) -> int:
    """The frame every GPU benchmark shares: environment line, table, footer, JSON file.

    ``run`` prints the table's rows as it goes and returns the results; ``footer`` may use
    its keys (e.g. ``{copy_gbs:.0f}``).
    """
    import torch

    if not torch.cuda.is_available():
        print(f"afdkit bench {name}: needs a CUDA GPU")
        return 2
    env = environment()
    print(f"# {env.get('device')}  commit {env.get('commit')}  {env['date']}")
    print(header)
    res = run()
    print(footer.format(**res))
    write_json(getattr(args, "out", None), {"env": env, **res})
    return 0


def hold_stream(seconds: float) -> None:
    """Keeps the current CUDA stream busy for ``seconds`` (capped at 1 s) while the host
    queues timed iterations behind it, so that CUDA events time the device work and not
    how fast Python issues it."""
    import torch

    torch.cuda._sleep(int(min(seconds, 1.0) * 2e9))


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if not path:
        return
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
