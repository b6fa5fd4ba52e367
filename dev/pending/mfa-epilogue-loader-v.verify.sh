#!/usr/bin/env bash
# One GPU call that verifies dev/pending/mfa-epilogue-loader-v.patch (see README.md):
# applies it to a scratch copy of the tree, builds two wheels in the background (the
# patch's default, and one with -DAFDKIT_MFA_LOADER_V), runs the harness A/B of its
# switches with timelines, memcheck on the small cases, then per wheel
# `pytest -m gpu tests/test_mfa.py` and `bench/bench_mfa.py`. Logs under $OUT/logs.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT=${OUT:-$PWD/out}; L=$OUT/logs; mkdir -p "$L"
T0=$(date +%s); el() { echo "[t+$(( $(date +%s) - T0 ))s] $*"; }
TMP=${TMPDIR:-/tmp}
W=$TMP/afdkit-pending-epi; rm -rf "$W" && mkdir -p "$W" && cp -r . "$W/" && cd "$W" || exit 1
git apply dev/pending/mfa-epilogue-loader-v.patch || { echo "FAIL: the patch does not apply"; exit 1; }
OUT=$L/gc bash bench/gpu_check.sh env > "$L/gc_env.out" 2>&1  # carried wheels onto PYTHONPATH
[ -d "$TMP/afdkit-site" ] && export PYTHONPATH=$TMP/afdkit-site
wheel() {  # NAME [ENV=VALUE ...]: a wheel of the patched tree in $TMP/wheel_NAME
  local name=$1; shift; rm -rf "$TMP/wt_$name" "$TMP/wheel_$name"; cp -r "$W" "$TMP/wt_$name"
  (cd "$TMP/wt_$name" && env "$@" CMAKE_BUILD_PARALLEL_LEVEL=4 nice -n 10 python3 -m pip wheel --no-build-isolation \
     --no-deps -w "$TMP/wheel_$name" . > "$L/wheel_$name.log" 2>&1; echo "wheel $name rc=$?")
}
wheel default PATCH=1 & WA=$!
wheel loader_v CUDAFLAGS=-DAFDKIT_MFA_LOADER_V & WB=$!
OUT=$L bash dev/mfa/ab_check.sh e2 e1=-DAFDKIT_MFA_EPILOGUE_V1 st=-DAFDKIT_MFA_STAGED_STORES lv=-DAFDKIT_MFA_LOADER_V \
  n64=-DAFDKIT_MFA_QK_N64 "lvn64=-DAFDKIT_MFA_LOADER_V -DAFDKIT_MFA_QK_N64" \
  prof=-DAFDKIT_MFA_PROFILE "proflv=-DAFDKIT_MFA_PROFILE -DAFDKIT_MFA_LOADER_V" > "$L/ab.out" 2>&1
el ab
grep -E "^== [a-z0-9]+ \(|^batch|back-to|ab_check" "$L/ab.out" | cut -c1-160 | head -40
awk '/^== sweep /{p=1} /^== profile/{p=0} p' "$L/ab.out" | cut -c1-120
grep -A1 "^== profile" "$L/ab.out" | grep -E "timeline|== profile" | cut -c1-720
for v in e2 lv st lvn64; do
  timeout 60 compute-sanitizer --tool memcheck "${AB_WORK:-$TMP/afdkit-ab}/$v/h" --small > "$L/memcheck_$v.log" 2>&1
  echo "memcheck $v rc=$? $(tail -1 "$L/memcheck_$v.log")"
done
wait $WA $WB; el wheels
for name in default loader_v; do
  python3 -m pip install -q --no-deps --force-reinstall --no-index "$TMP/wheel_$name"/afdkit-*.whl > "$L/install_$name.log" 2>&1 \
    || { echo "install $name failed"; continue; }
  (cd "$TMP" && timeout 120 python3 -X faulthandler -m pytest -q -ra --timeout=100 -m gpu "$W/tests/test_mfa.py" \
     > "$L/pytest_mfa_$name.log" 2>&1; echo "pytest mfa $name rc=$? $(tail -1 "$L/pytest_mfa_$name.log")")
  (cd "$TMP" && timeout 100 python3 "$W/bench/bench_mfa.py" --out "$L/bench_mfa_$name.json" > "$L/bench_mfa_$name.log" 2>&1; echo "bench $name rc=$?")
  grep -E "^ +(1|8|64|128) +(4096|32768) +1 " "$L/bench_mfa_$name.log"; tail -1 "$L/bench_mfa_$name.log"
  el "wheel $name tested"
done
