#!/usr/bin/env bash
# Compile-checks every .cu of csrc/mfa for sm_90a, one nvcc at a time, and fails
# when ptxas reports spills or a stack frame in the hot kernels, or (with cuobjdump
# and nvdisasm on PATH) local memory in the sm90 decode's tile loop.
# Usage: dev/mfa/build_check.sh [extra nvcc flags]   (from any directory)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
NVCC=${NVCC:-nvcc}
OUT=${BUILD_CHECK_OUT:-build/mfa_check}
mkdir -p "$OUT"
FLAGS=(-std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -Xptxas -v,-warn-spills
       --expt-relaxed-constexpr -lineinfo -I csrc "$@")
status=0
for src in csrc/mfa/*.cu csrc/mfa/instantiations/*.cu; do
  obj="$OUT/$(basename "${src%.cu}").o"
  log="$OUT/$(basename "${src%.cu}").log"
  echo "== $src"
  if ! "$NVCC" "${FLAGS[@]}" -c "$src" -o "$obj" >"$log" 2>&1; then
    cat "$log"; echo "FAIL: $src does not compile"; status=1; continue
  fi
  # ptxas -v prints: Compiling entry function '<mangled>' ... Used N registers ...
  # stack frame/spill lines. Summarise per kernel.
  awk '/Compiling entry function/ { match($0, /'"'"'[^'"'"']+'"'"'/); k = substr($0, RSTART+1, RLENGTH-2) }
       /bytes stack frame/ { sf[k] = $0 }
       /Used [0-9]+ registers/ { print "   " k; print "      " $0; if (k in sf) print "      " sf[k] }' "$log" \
    | sed -E 's/ptxas info *: //' | c++filt | cut -c1-220
  grep -iE "warning|error" "$log" | grep -v "^$" | sed 's/^/   /' || true
  # Hot kernels (SIMT oracle, combine, append) must not spill. The sm90 decode runs at
  # its setmaxnreg caps and parks per-segment values (Q store, segment setup, loader
  # cursors): up to 160 bytes of stack, but nothing in the consumers' tile loop, which
  # sass_loop_check.py verifies from the SASS when cuobjdump (+ nvdisasm) is on PATH.
  if awk '/Compiling entry function/ {k=$0} /bytes stack frame/ {print k " @@ " $0}' "$log" \
     | awk -F' @@ ' '{ sm90 = ($1 ~ /decode_sm90_kernel/); split($2, w, " ")
         stack = w[1] + 0; loads = w[9] + 0; stores = w[5] + 0
         if (sm90 ? (stack > 160) : (stack > 0 || loads > 0 || stores > 0)) bad = 1 } END { exit !bad }'; then
    echo "FAIL: $src has a stack frame or spills (see $log)"; status=1
  fi
  if [[ "$src" == *decode_sm90_* ]]; then  # no local memory in the consumers' tile loop
    if command -v cuobjdump >/dev/null && command -v nvdisasm >/dev/null; then
      python3 dev/mfa/sass_loop_check.py "$obj" || { echo "FAIL: $src: local memory in the tile loop"; status=1; }
    else
      echo "   (no cuobjdump/nvdisasm on PATH: tile-loop local-memory check skipped)"
    fi
  fi
  if grep -q "C7508\|C7510\|serialized" "$log"; then
    echo "FAIL: $src: setmaxnreg ignored or wgmma serialized (see $log)"; status=1
  fi
done
if [ "${BUILD_HARNESS:-0}" = 1 ]; then  # the standalone GPU harness links everything
  echo "== dev/mfa/harness.cu"
  "$NVCC" -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -I csrc \
    dev/mfa/harness.cu csrc/mfa/*.cu csrc/mfa/instantiations/*.cu -o "$OUT/mfa_harness" || status=1
fi
[ $status -eq 0 ] && echo "build_check: OK" || echo "build_check: FAILED"
exit $status
