#!/usr/bin/env bash
# One GPU call that verifies the pending patches of this folder (see README.md): applies
# them to a scratch copy of the tree, runs the MFA harness (correctness, timing, profile,
# local-memory report), builds one wheel with every patch, and runs the GPU tests the
# patches touch. With fewer GPUs than ranks the multi-rank tests share cuda:0
# (correctness only; timings there are not NVLink numbers). Logs under $OUT.
#
#   dev/pending/gpu_verify.sh [patch-name ...]     (default: every *.patch here, in name order)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
T0=$(date +%s); el() { echo "[t+$(( $(date +%s) - T0 ))s] $*"; }
SRC=$PWD
PATCHES=("$@"); [ ${#PATCHES[@]} -gt 0 ] || PATCHES=($(cd dev/pending && ls *.patch))
W=${TMPDIR:-/tmp}/afdkit-pending
rm -rf "$W" && mkdir -p "$W" && cp -r . "$W/" && cd "$W" || exit 1
for p in "${PATCHES[@]}"; do
  git apply "$SRC/dev/pending/$p" 2>/dev/null || git apply -3 "$SRC/dev/pending/$p" || { echo "FAIL: $p does not apply"; exit 1; }
  echo "applied $p"
done
has() { [[ " ${PATCHES[*]} " == *"$1"* ]]; }
if has mfa-; then
  OUT=$OUT/mfa bash dev/mfa/quick_check.sh; el mfa-harness
fi
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16} bash bench/gpu_check.sh env build > "$OUT/build.out" 2>&1
tail -3 "$OUT/build.out"; el build
[ -d /tmp/afdkit-site ] && export PYTHONPATH=/tmp/afdkit-site
t() { local name=$1; shift; timeout 200 python3 -X faulthandler -m pytest -q -ra --timeout=120 "$@" > "$OUT/$name.log" 2>&1
      echo "$name rc=$? $(tail -1 "$OUT/$name.log")"; el "$name"; }
has mfa- && t pytest_mfa -m gpu tests/test_mfa.py
has moe-dispatch && t pytest_dispatch_ipc -m gpu tests/test_dispatch_ipc.py
has mesh-lean && t pytest_mesh_stream tests/test_mesh_gpu_stream.py
if has mfa-; then
  timeout 60 compute-sanitizer --tool memcheck build/h --small > "$OUT/memcheck.log" 2>&1
  echo "memcheck rc=$? $(tail -1 "$OUT/memcheck.log")"; el memcheck
fi
