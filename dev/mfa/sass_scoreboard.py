#!/usr/bin/env python3
"""Which loads a role's start waits for, read from the scoreboard bits of the SASS.

A global load is "variable latency": ptxas gives it one of six scoreboards (SB0-SB5)
and the first instruction that needs its result carries a wait mask on that
scoreboard. Loads sharing a scoreboard are waited for together, and a load issued
after such a wait costs a round trip of its own. cuobjdump does not print these bits;
they are fields of the control word in the high 64 bits of each instruction (Volta
and later): stall [41:45), yield [45], write scoreboard [46:49) (7 = none), read
scoreboard [49:52), wait mask [52:58).

This prints, from the first `BAR.SYNC` of the kernel (the __syncthreads after the
mbarrier setup) on, every load, TMA/bulk copy, branch and instruction that waits on a
variable-latency scoreboard (SB2-SB5), so a round trip shows as "load ... sb N" followed
by "waits [N]" before the next load. `--from` starts at another instruction instead
(e.g. `DEALLOC` for the loader warpgroup, after its setmaxnreg.dec).

    python3 dev/mfa/sass_scoreboard.py OBJECT.o [--from BAR.SYNC] [--count 600]
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys

_LINE = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);\s*/\* (0x[0-9a-f]+) \*/")
_HIGH = re.compile(r"\s*/\* (0x[0-9a-f]+) \*/")
_SHOW = ("LDG", "UTMALDG", "UBLKCP", "BRA", "EXIT", "BAR", "SHFL")


def decode(sass: str) -> list[tuple[str, str, int, int]]:
    """(address, instruction, write scoreboard or 7, wait mask) per instruction."""
    lines = sass.splitlines()
    out = []
    for i, line in enumerate(lines[:-1]):
        m, m2 = _LINE.match(line), _HIGH.match(lines[i + 1])
        if m and m2:
            hi = int(m2.group(1), 16)
            out.append((m.group(1), m.group(2).strip(), (hi >> 46) & 7, (hi >> 52) & 0x3F))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("object")
    ap.add_argument("--from", dest="start", default="BAR.SYNC", help="first instruction (substring)")
    ap.add_argument("--count", type=int, default=600, help="instructions to scan")
    ap.add_argument("--cuobjdump", default=shutil.which("cuobjdump") or "cuobjdump")
    args = ap.parse_args(argv)
    sass = subprocess.run([args.cuobjdump, "-sass", args.object], capture_output=True, text=True, check=True).stdout
    ins = decode(sass)
    start = next((k for k, x in enumerate(ins) if args.start in x[1]), None)
    if start is None:
        print(f"no instruction matches {args.start!r}", file=sys.stderr)
        return 2
    for addr, text, wsb, wait in ins[start:start + args.count]:
        waits = [b for b in range(2, 6) if wait >> b & 1]  # SB0/SB1: short (shared memory, S2R)
        if waits or any(text.startswith(s) or f" {s}" in text for s in _SHOW):
            sb = f"sb {wsb}" if wsb != 7 else "    "
            print(f"{addr}  {text[:64]:<64} {sb}  {'waits ' + str(waits) if waits else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
