#!/usr/bin/env bash
# A/B of sm90 decode variants in one GPU call. Builds dev/mfa/harness.cu once per
# variant from this tree with extra nvcc flags (a compile-time switch per variant),
# runs each harness (correctness matrix + timing table; the first variant also with
# --breakdown), sweeps the small-batch shapes (--sweep) twice with the variants
# alternating, and prints the CTA timeline of every variant whose flags include
# -DAFDKIT_MFA_PROFILE. Compare only numbers from the same call.
#
# Usage: dev/mfa/ab_check.sh NAME[=FLAGS] ...        (from any directory)
#   dev/mfa/ab_check.sh base new=-DAFDKIT_MFA_QK_PROMOTE=4 prof=-DAFDKIT_MFA_PROFILE
# Logs go under ${OUT:-build/ab}/ab; the exit status is non-zero when a variant does not
# build or fails its correctness matrix. AB_BUILD_ONLY=1 stops after the builds
# ($AB_WORK/NAME/h, AB_WORK default /tmp/afdkit-ab).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
[ $# -ge 1 ] || { sed -n '2,13p' "${BASH_SOURCE[0]}"; exit 2; }
LOGS=${OUT:-build/ab}/ab
WORK=${AB_WORK:-/tmp/afdkit-ab}
mkdir -p "$LOGS"
rm -rf "$WORK" && mkdir -p "$WORK"
FLAGS="-std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -I $PWD/csrc"
names=() status=0
for arg in "$@"; do
  name=${arg%%=*}; flags=""; [[ "$arg" == *=* ]] && flags=${arg#*=}
  names+=("$name"); echo "$flags" > "$WORK/$name.flags"; mkdir -p "$WORK/$name"
done
# every (variant, source) pair compiles in parallel; one link per variant
for name in "${names[@]}"; do
  for src in dev/mfa/harness.cu csrc/mfa/*.cu csrc/mfa/instantiations/*.cu; do echo "$name $src"; done
done | xargs -P "$(nproc)" -L 1 bash -c 'n=$0; s=$1; o='"$WORK"'/$n/$(echo $s | tr / _).o
  nvcc '"$FLAGS"' $(cat '"$WORK"'/$n.flags) -Xptxas -warn-spills -c $s -o $o > $o.log 2>&1 || echo "COMPILE FAIL $n $s"' \
  | tee "$LOGS/compile.txt"
for name in "${names[@]}"; do
  nvcc -gencode=arch=compute_90a,code=sm_90a "$WORK/$name"/*.o -o "$WORK/$name/h" || { echo "LINK FAIL $name"; status=1; }
done
grep -q FAIL "$LOGS/compile.txt" && status=1
if [ "${AB_BUILD_ONLY:-0}" = 1 ]; then  # the binaries only: $AB_WORK/NAME/h (dev/mfa/ncu_check.sh)
  exit $status
fi

profiled() { grep -q AFDKIT_MFA_PROFILE "$WORK/$1.flags"; }
first=1
for name in "${names[@]}"; do
  profiled "$name" && continue
  extra=""; [ $first = 1 ] && extra=--breakdown; first=0
  timeout 300 "$WORK/$name/h" $extra > "$LOGS/$name.time.log" 2>&1 || status=1
  echo "== $name ($(cat "$WORK/$name.flags")): $(grep -E '^correctness' "$LOGS/$name.time.log")," \
       "max sm90 |lse err| $(grep -E '^(fp8|bf16)' "$LOGS/$name.time.log" | awk '{print $(NF-3)}' | sort -g | tail -1)"
  grep -qE '^correctness' "$LOGS/$name.time.log" || echo "  no correctness table; the log ends: $(tail -1 "$LOGS/$name.time.log")"
  grep -E '^batch|back-to-back' "$LOGS/$name.time.log" | cut -c1-118
done
sweep_table() {  # one line per shape: event-timed, then graph-timed decode / kernel / combine
  python3 - "$1" <<'EOF'
import re, sys
lines = open(sys.argv[1]).read().splitlines()
for i, line in enumerate(lines):
    m = re.match(r"batch\s+(\d+) x\s+(\d+)\s+decode\s+([\d.]+) us.*tiles/part max (\d+)", line)
    if m and i + 1 < len(lines) and "back-to-back" in lines[i + 1]:
        n = re.findall(r"(?:decode|alone|kernels|KV) ([\d.]+)", lines[i + 1])
        print(f"  b{m[1]:>3} x{int(m[2]) // 1024:>3}K tiles/part {m[4]:>3} | event {m[3]:>6} | graph: decode {n[0]:>6}"
              f" kernel {n[1]:>6} combine {n[2]:>4} | copy {n[4]}")
EOF
}
for pass in 1 2; do
  for name in "${names[@]}"; do
    profiled "$name" && continue
    timeout 120 "$WORK/$name/h" --sweep > "$LOGS/$name.sweep$pass.log" 2>&1 || status=1
    echo "== sweep $name, pass $pass (us per call)"; sweep_table "$LOGS/$name.sweep$pass.log"
  done
done
for name in "${names[@]}"; do
  profiled "$name" || continue
  timeout 120 "$WORK/$name/h" --profile > "$LOGS/$name.profile.log" 2>&1 || status=1
  echo "== profile $name"; grep -E '^== profile|timeline' "$LOGS/$name.profile.log" | cut -c1-1000
done
echo "ab_check: $([ $status = 0 ] && echo OK || echo FAIL) (logs in $LOGS)"
exit $status
