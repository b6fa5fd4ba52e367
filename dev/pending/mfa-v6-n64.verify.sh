#!/usr/bin/env bash
# One GPU call (~5 min on an H100) that verifies dev/pending/mfa-v6-n64.patch for landing
# and A/Bs dev/pending/mfa-plan-fed-start.patch on top of it (see README.md):
#   1. a wheel of main + the n64 patch: `pytest -m gpu tests/test_mfa.py`, bench_mfa;
#   2. the harness of that tree (`ab_check.sh base prof`: correctness, timing, the CTA
#      timeline with the new start events) and compute-sanitizer memcheck `--small`;
#   3. the harness of n64 + plan-fed (`fed`, `pl` = planned without the table, `proffed`).
# Logs under $OUT/logs; the summary lines print as each step ends.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT=${OUT:-$PWD/out}; L=$OUT/logs; mkdir -p "$L"
T0=$(date +%s); el() { echo "[t+$(( $(date +%s) - T0 ))s] $*"; }
TMP=${TMPDIR:-/tmp}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
OUT=$L/gc bash bench/gpu_check.sh env > "$L/gc_env.out" 2>&1  # carried wheels onto PYTHONPATH
[ -d "$TMP/afdkit-site" ] && export PYTHONPATH=$TMP/afdkit-site
W1=$TMP/afdkit-n64; W2=$TMP/afdkit-n64-fed
rm -rf "$W1" "$W2"; mkdir -p "$W1" "$W2"; cp -r . "$W1/"; cp -r . "$W2/"
(cd "$W1" && git apply dev/pending/mfa-v6-n64.patch) || { echo "FAIL: the n64 patch does not apply"; exit 1; }
(cd "$W2" && git apply dev/pending/mfa-v6-n64.patch && git apply dev/pending/mfa-plan-fed-start.patch) \
  || echo "FAIL: the plan-fed patch does not apply after the n64 patch"
rm -rf "$TMP/wheel_n64"
(cd "$W1" && CMAKE_BUILD_PARALLEL_LEVEL=6 python3 -m pip wheel --no-build-isolation --no-deps -w "$TMP/wheel_n64" . \
   > "$L/wheel_n64.log" 2>&1; echo "wheel rc=$?") & WHEEL=$!
summary() {  # the correctness and timing lines of one ab_check output
  grep -vE "^  b" "$1" | grep -E "^==|^batch|FAIL|ab_check" | grep -v "^== sweep\|^== profile" | cut -c1-150
  awk '/^== sweep /{p=1} /^== profile/{p=0} p' "$1" | grep -E "pass 2|b  1 x  4K|b  1 x 32K|b  8 x 32K|b  8 x 64K" | cut -c1-120
  grep -A1 "^== profile" "$1" | grep -E "timeline|== profile" | cut -c1-1000
}
(cd "$W1" && AB_WORK=$TMP/ab_n64 OUT=$L/n64 timeout 240 bash dev/mfa/ab_check.sh base prof=-DAFDKIT_MFA_PROFILE > "$L/ab_n64.out" 2>&1)
el "harness n64"; summary "$L/ab_n64.out"
timeout 60 compute-sanitizer --tool memcheck "$TMP/ab_n64/base/h" --small > "$L/memcheck_n64.log" 2>&1
echo "memcheck rc=$? $(tail -1 "$L/memcheck_n64.log")"
wait $WHEEL; el wheel
python3 -m pip install -q --no-deps --force-reinstall --no-index "$TMP"/wheel_n64/afdkit-*.whl > "$L/install_n64.log" 2>&1 \
  || echo "install failed"
(cd "$TMP" && timeout 150 python3 -X faulthandler -m pytest -q -ra --timeout=100 -m gpu "$W1/tests/test_mfa.py" \
   > "$L/pytest_mfa_n64.log" 2>&1; echo "pytest mfa rc=$? $(tail -1 "$L/pytest_mfa_n64.log")")
grep -E "^E .*assert|FAILED|^E +[A-Z][a-z]+Error" "$L/pytest_mfa_n64.log" | sort | uniq -c | head -8
(cd "$TMP" && timeout 100 python3 "$W1/bench/bench_mfa.py" --out "$L/bench_mfa_n64.json" > "$L/bench_mfa_n64.log" 2>&1; echo "bench rc=$?")
grep -E "^ +(1|8|64|128) +(4096|32768) +[12] " "$L/bench_mfa_n64.log"; tail -1 "$L/bench_mfa_n64.log"
el "n64 done"
(cd "$W2" && AB_WORK=$TMP/ab_fed OUT=$L/fed timeout 200 bash dev/mfa/ab_check.sh fed pl=-DAFDKIT_MFA_HARNESS_PLAIN_PLAN \
   proffed=-DAFDKIT_MFA_PROFILE > "$L/ab_fed.out" 2>&1)
el "harness plan-fed"; summary "$L/ab_fed.out"
