#!/usr/bin/env bash
# Nsight Compute on the sm90 decode kernel, one GPU call (~30 s on an H100): builds the
# harness from this tree (with -lineinfo; extra nvcc flags from $NVCC_EXTRA), checks its
# correctness matrix, then for each shape records one decode launch (the 4th; caches
# flushed before it, clocks left alone) with the source counters and prints the
# instructions with the most warp-stall samples (dev/mfa/ncu_stalls.py).
#
# Usage: dev/mfa/ncu_check.sh [B:LEN ...]          (default: 1:32768 64:4096)
# Reports, details pages and source CSVs under ${OUT:-build/ncu}/ncu (NCU_PACK=1: one
# archive, ncu.tgz, instead).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
L=${OUT:-build/ncu}/ncu; mkdir -p "$L"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
[ -n "$NCU" ] || { echo "ncu_check: no ncu found"; exit 1; }
B=${NCU_WORK:-/tmp/afdkit-ncu}
AB_WORK=$B AB_BUILD_ONLY=1 OUT="$L" bash dev/mfa/ab_check.sh "ncu=-lineinfo ${NVCC_EXTRA:-}" > "$L/build.log" 2>&1 \
  || { echo "ncu_check: the harness does not build"; tail -5 "$L/build.log"; exit 1; }
B=$B/ncu
timeout 120 "$B/h" --no-time > "$L/correctness.log" 2>&1; echo "harness rc=$? $(grep correctness "$L/correctness.log")"
shapes=("$@"); [ ${#shapes[@]} -gt 0 ] || shapes=(1:32768 64:4096)
for s in "${shapes[@]}"; do
  b=${s%%:*} len=${s##*:} n=b${s%%:*}_${s##*:}
  timeout 300 "$NCU" --clock-control none --cache-control all -k regex:decode_sm90 --launch-skip 3 --launch-count 1 \
    --section SpeedOfLight --section SchedulerStats --section WarpStateStats --section SourceCounters \
    -f -o "$L/$n" "$B/h" --one "$b" "$len" > "$L/$n.run.log" 2>&1 || { echo "ncu $n failed"; tail -5 "$L/$n.run.log"; continue; }
  "$NCU" -i "$L/$n.ncu-rep" --page details > "$L/$n.details.txt" 2>&1
  "$NCU" -i "$L/$n.ncu-rep" --page source --csv --print-source sass > "$L/$n.source.csv" 2>&1 && gzip -f "$L/$n.source.csv"
  echo "== $n"
  grep -E "^\s+(Duration|DRAM Throughput|Issued Warp Per Scheduler|Warp Cycles Per Issued)" "$L/$n.details.txt"
  python3 dev/mfa/ncu_stalls.py "$L/$n.source.csv.gz" --top 25
done
# NCU_PACK=1: one archive instead of many files (for a machine that returns only a few files).
if [ "${NCU_PACK:-0}" = 1 ]; then
  tar czf "$L.tgz" -C "$L" . && rm -rf "$L" && echo "packed into $L.tgz"
fi
