#!/usr/bin/env python3
"""Per-instruction warp-stall samples of one kernel, from Nsight Compute's source page.

Input: the CSV of `ncu -i REPORT --page source --csv --print-source sass` (optionally
gzipped), recorded with `--section SourceCounters`. Prints the instructions with the
most samples (offset from the kernel's first instruction, samples, warp instructions
executed, SASS, top two stall reasons), the stall reasons over the whole kernel and, with
--regions, the samples per address range (e.g. start / tile loop / epilogue / loader,
read off the SASS).

  python3 dev/mfa/ncu_stalls.py ncu_b1_32768.source.csv.gz --top 40 \
      --regions start:0:59c0 loop:59c0:a980 epilogue:a980:d7e0 loader:d7e0:30000
"""
from __future__ import annotations

import argparse
import collections
import csv
import gzip
import sys
from dataclasses import dataclass


@dataclass
class Row:
    offset: int
    samples: float
    executed: float
    sass: str
    reasons: dict[str, float]


def _num(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def read_rows(path: str) -> list[Row]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", newline="") as f:
        table = list(csv.reader(f))
    head_at = next((i for i, r in enumerate(table) if r and r[0].strip().startswith("Address")), None)
    if head_at is None:
        sys.exit(f"{path}: no 'Address' header row (was it written with --page source --csv?)")
    head = table[head_at]
    col = {name: i for i, name in enumerate(head)}
    need = ["Source", "Warp Stall Sampling (All Samples)", "Instructions Executed"]
    missing = [n for n in need if n not in col]
    if missing:
        sys.exit(f"{path}: missing columns {missing} (record with --section SourceCounters)")
    stalls = [n for n in head if n.startswith("stall_") and "(Not Issued)" not in n]
    body = [r for r in table[head_at + 1:] if len(r) == len(head)]
    base = int(body[0][0], 16)
    return [Row(int(r[0], 16) - base, _num(r[col[need[1]]]), _num(r[col[need[2]]]), r[col["Source"]].strip(),
                {s[6:]: _num(r[col[s]]) for s in stalls}) for r in body]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=40, help="instructions to list, most samples first")
    ap.add_argument("--regions", nargs="*", default=[], metavar="NAME:START:END", help="hex byte offsets")
    args = ap.parse_args()
    rows = read_rows(args.csv)
    total = sum(r.samples for r in rows) or 1.0
    print(f"{len(rows)} instructions, {total:.0f} samples")
    for r in sorted(rows, key=lambda r: -r.samples)[: args.top]:
        why = sorted(r.reasons.items(), key=lambda kv: -kv[1])[:2]
        print(f"{r.offset:05x} {r.samples:6.0f} {100 * r.samples / total:5.1f}% {r.executed:8.0f}  {r.sass[:60]:60s} "
              + " ".join(f"{k}:{v:.0f}" for k, v in why if v))
    reasons = collections.Counter()
    for r in rows:
        reasons.update(r.reasons)
    print("stall reasons: " + ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in reasons.most_common() if v))
    for spec in args.regions:
        name, lo, hi = spec.split(":")
        part = [r for r in rows if int(lo, 16) <= r.offset < int(hi, 16)]
        n = sum(r.samples for r in part)
        why = collections.Counter()
        for r in part:
            why.update(r.reasons)
        print(f"{name:12s} {n:6.0f} {100 * n / total:5.1f}%  " +
              ", ".join(f"{k} {v:.0f}" for k, v in why.most_common(5) if v))


if __name__ == "__main__":
    main()
