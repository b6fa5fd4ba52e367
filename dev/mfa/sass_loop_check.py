#!/usr/bin/env python3
"""Fails when the sm90 decode kernel touches local memory inside its tile loop.

The decode kernel runs at its register caps (setmaxnreg), so ptxas parks a few values
in local memory. Outside the loops that is harmless (a few loads per segment); inside
the consumers' tile loop it is not. ptxas only reports the total, so this reads the
SASS: the tile loop is the innermost backward branch whose range holds every PV wgmma
(HGMMA 64x128x16, the only 128-wide wgmma of the kernel); LDL/STL inside it fail.

    python3 dev/mfa/sass_loop_check.py OBJECT.o [--cuobjdump PATH]
Exit 0: clean; 1: local memory in the loop; 2: could not analyse.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys

_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
_BRA = re.compile(r"\bBRA\s+(?:\S+,\s*)?0x([0-9a-f]+)")


def kernels(sass: str) -> dict[str, list[tuple[int, str]]]:
    out: dict[str, list[tuple[int, str]]] = {}
    name = None
    for line in sass.splitlines():
        if "Function :" in line:
            name = line.split("Function :", 1)[1].strip()
            out[name] = []
        elif name and (m := _INSN.search(line)):
            out[name].append((int(m.group(1), 16), m.group(2).strip()))
    return out


def check_kernel(insns: list[tuple[int, str]]) -> tuple[int, int, int] | None:
    """(loop start, loop end, local accesses inside) for the tile loop, or None."""
    pv = [a for a, t in insns if "HGMMA.64x128x16" in t]
    if not pv:
        return None
    lo, hi = min(pv), max(pv)
    loops = [(int(m.group(1), 16), a) for a, t in insns if (m := _BRA.search(t)) and int(m.group(1), 16) <= lo and a >= hi]
    if not loops:
        return None
    # Innermost: the shortest range covering the PV wgmmas (out-of-line wait retries
    # branch back from the end of the function and cover everything).
    start, end = min(loops, key=lambda r: r[1] - r[0])
    local = sum(1 for a, t in insns if start <= a <= end and re.search(r"\b(LDL|STL)\b", t))
    return start, end, local


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("objects", nargs="+")
    ap.add_argument("--cuobjdump", default=shutil.which("cuobjdump"))
    args = ap.parse_args()
    if not args.cuobjdump:
        print("sass_loop_check: no cuobjdump on PATH; skipped")
        return 2
    status = 0
    for obj in args.objects:
        r = subprocess.run([args.cuobjdump, "-sass", obj], capture_output=True, text=True)
        if r.returncode != 0:
            print(f"sass_loop_check: cuobjdump failed on {obj}: {r.stderr.strip()[:200]}")
            return 2
        sass = r.stdout
        found = False
        for name, insns in kernels(sass).items():
            if "decode_sm90_kernel" not in name:
                continue
            r = check_kernel(insns)
            if r is None:
                print(f"sass_loop_check: {obj}: no tile loop found in {name[:60]}")
                return 2
            found = True
            start, end, local = r
            verdict = "OK" if local == 0 else "FAIL"
            print(f"   tile loop 0x{start:x}..0x{end:x}: {local} local-memory accesses  {verdict}")
            if local:
                status = 1
        if not found:
            print(f"sass_loop_check: {obj}: no decode_sm90_kernel")
            return 2
    return status


if __name__ == "__main__":
    sys.exit(main())
