#!/usr/bin/env bash
# One GPU call (~5 min on an H100) that verifies dev/pending/mfa-v6-n64.patch and
# dev/pending/mfa-v6-start-loads.patch (applied after it) for landing (see README.md):
#   1. the harness of main + n64 (`base`, `prof`) and of main + n64 + start-loads
#      (`start`, `profstart`): correctness (13 cases each), timing, the CTA timelines
#      with the start events; compute-sanitizer memcheck `--small` on both;
#   2. a wheel of main + n64 + start-loads: `pytest -m gpu tests/test_mfa.py`, bench_mfa.
#   3. the harness of main + n64 + start-loads + plan-fed start (`fed`, and `pl` = the same
#      build planning without the block table): the plan-fed start's A/B.
# If start-loads fails and n64 passes, land n64 alone after a wheel run of it.
# Logs under $OUT/logs; the summary lines print as each step ends.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT=${OUT:-$PWD/out}; L=$OUT/logs; mkdir -p "$L"
T0=$(date +%s); el() { echo "[t+$(( $(date +%s) - T0 ))s] $*"; }
TMP=${TMPDIR:-/tmp}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
OUT=$L/gc bash bench/gpu_check.sh env > "$L/gc_env.out" 2>&1  # carried wheels onto PYTHONPATH
[ -d "$TMP/afdkit-site" ] && export PYTHONPATH=$TMP/afdkit-site
W1=$TMP/afdkit-n64; W2=$TMP/afdkit-n64-start
rm -rf "$W1" "$W2"; mkdir -p "$W1" "$W2"; cp -r . "$W1/"; cp -r . "$W2/"
(cd "$W1" && git apply dev/pending/mfa-v6-n64.patch) || { echo "FAIL: the n64 patch does not apply"; exit 1; }
(cd "$W2" && git apply dev/pending/mfa-v6-n64.patch && git apply dev/pending/mfa-v6-start-loads.patch) \
  || { echo "FAIL: the start-loads patch does not apply after the n64 patch"; exit 1; }
rm -rf "$TMP/wheel_start"
(cd "$W2" && CMAKE_BUILD_PARALLEL_LEVEL=6 nice -n 10 python3 -m pip wheel --no-build-isolation --no-deps \
   -w "$TMP/wheel_start" . > "$L/wheel_start.log" 2>&1; echo "wheel rc=$?") & WHEEL=$!
summary() {  # the correctness and timing lines of one ab_check output
  grep -vE "^  b" "$1" | grep -E "^==|^batch|FAIL|ab_check" | grep -v "^== sweep\|^== profile" | cut -c1-150
  awk '/^== sweep /{p=1} /^== profile/{p=0} p' "$1" | grep -E "pass 2|b  1 x  4K|b  1 x 32K|b  8 x 32K|b  8 x 64K" | cut -c1-120
  grep -A1 "^== profile" "$1" | grep -E "timeline|== profile" | cut -c1-1000
}
(cd "$W1" && AB_WORK=$TMP/ab_n64 OUT=$L/n64 timeout 240 bash dev/mfa/ab_check.sh base prof=-DAFDKIT_MFA_PROFILE > "$L/ab_n64.out" 2>&1)
el "harness n64"; summary "$L/ab_n64.out"
(cd "$W2" && AB_WORK=$TMP/ab_start OUT=$L/start timeout 240 bash dev/mfa/ab_check.sh start profstart=-DAFDKIT_MFA_PROFILE \
   > "$L/ab_start.out" 2>&1)
el "harness n64 + start-loads"; summary "$L/ab_start.out"
for v in n64/base start/start; do
  timeout 60 compute-sanitizer --tool memcheck "$TMP/ab_${v%%/*}/${v##*/}/h" --small > "$L/memcheck_${v%%/*}.log" 2>&1
  echo "memcheck ${v%%/*} rc=$? $(tail -1 "$L/memcheck_${v%%/*}.log")"
done
wait $WHEEL; el wheel
python3 -m pip install -q --no-deps --force-reinstall --no-index "$TMP"/wheel_start/afdkit-*.whl > "$L/install_start.log" 2>&1 \
  || echo "install failed"
(cd "$TMP" && timeout 150 python3 -X faulthandler -m pytest -q -ra --timeout=100 -m gpu "$W2/tests/test_mfa.py" \
   > "$L/pytest_mfa_start.log" 2>&1; echo "pytest mfa rc=$? $(tail -1 "$L/pytest_mfa_start.log")")
grep -E "^E .*assert|FAILED|^E +[A-Z][a-z]+Error" "$L/pytest_mfa_start.log" | sort | uniq -c | head -8
(cd "$TMP" && timeout 100 python3 "$W2/bench/bench_mfa.py" --out "$L/bench_mfa_start.json" > "$L/bench_mfa_start.log" 2>&1; echo "bench rc=$?")
grep -E "^ +(1|8|64|128) +(4096|32768) +[12] " "$L/bench_mfa_start.log"; tail -1 "$L/bench_mfa_start.log"
el "landing candidate done"
W3=$TMP/afdkit-n64-start-fed; rm -rf "$W3"; mkdir -p "$W3"; cp -r "$W2/." "$W3/"; rm -rf "$W3/build"
if (cd "$W3" && git apply dev/pending/mfa-plan-fed-start.patch); then
  (cd "$W3" && AB_WORK=$TMP/ab_fed OUT=$L/fed timeout 240 bash dev/mfa/ab_check.sh fed pl=-DAFDKIT_MFA_HARNESS_PLAIN_PLAN \
     proffed=-DAFDKIT_MFA_PROFILE > "$L/ab_fed.out" 2>&1)
  el "harness plan-fed"; summary "$L/ab_fed.out"
else
  echo "FAIL: the plan-fed patch does not apply after n64 + start-loads"
fi
el done
