"""Runs the stream-ordered channel scenarios of tests/test_mesh_gpu_stream.py one by one
with short deadlines, printing every rank's error in full and, for a rank that hangs, the
Python stacks of all its threads (faulthandler) -- a debugging aid for GPU hosts.

    python3 dev/mesh/stream_debug.py [scenario ...]     (default: all)
"""

from __future__ import annotations

import faulthandler
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests"))

DEADLINE_S = float(os.environ.get("STREAM_DEBUG_DEADLINE_S", "40"))


def _wrapped(ctx):
    import test_mesh_gpu_stream as t

    faulthandler.dump_traceback_later(DEADLINE_S - 8, exit=False)
    name = ctx.args.pop("_fn")
    return getattr(t, name)(ctx)


SCENARIOS = {
    "rt-1A1F-broadcast-ipc": ("_round_trips", 2, {"mode": "broadcast", "layers": 8, "ipc": True}, False),
    "rt-1A1F-routed-ipc": ("_round_trips", 2, {"mode": "routed", "layers": 8, "ipc": True}, False),
    "refuse-ucx": ("_refuses_ucx", 2, {}, True),
    "host": ("_host_not_blocked", 2, {}, False),
    "graph": ("_graph", 2, {}, False),
    "watchdog": ("_watchdog", 2, {}, False),
    "profile": ("_profiled", 2, {}, False),
    "rt-2A2F-routed-ipc": ("_round_trips", 4, {"mode": "routed", "layers": 8, "ipc": True}, False),
}


def main(names: list[str]) -> int:
    import torch

    from afdkit.mesh.testing import run_ranks

    import test_mesh_gpu_stream as t

    bad = 0
    for name in names or list(SCENARIOS):
        # name#tag repeats a scenario; name@eager runs it with CUDA_MODULE_LOADING=EAGER
        fn, n, args, ucx = SCENARIOS[name.split("#")[0].split("@")[0]]
        env = dict(t.UCX_CUDA_ENV if ucx else {})
        if "@eager" in name:
            env["CUDA_MODULE_LOADING"] = "EAGER"
        if torch.cuda.device_count() < n:
            print(f"== {name}: skipped (needs {n} GPUs)", flush=True)
            continue
        roles = ["attention"] * (n // 2) + ["ffn"] * (n // 2)
        t0 = time.monotonic()
        res = run_ranks(_wrapped, roles, args={**args, "_fn": fn}, env=env,
                        timeout_s=DEADLINE_S)
        ok = all(r.ok for r in res)
        bad += not ok
        print(f"== {name}: {'ok' if ok else 'FAILED'} in {time.monotonic() - t0:.1f} s", flush=True)
        for r in res:
            print(f"  rank {r.rank}: ok={r.ok} exit={r.exitcode} value={r.value!r} {r.error_type}", flush=True)
            if not r.ok:
                print("    " + r.error.replace("\n", "\n    "), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
