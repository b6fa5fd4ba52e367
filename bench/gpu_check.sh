#!/usr/bin/env bash
# One call on a GPU host: build afdkit, run the GPU tests and the benchmarks, keep
# every log under $OUT (default ./out), and print a short table last.
#
#   bench/gpu_check.sh [STAGE ...]     stages: env build test bench harness (default: all but harness)
#
# Offline hosts: wheels the host lacks (libucx-cu13, nvidia-cutlass) are taken from
# ./.whl (see README) and installed into a scratch folder on PYTHONPATH.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
STAGES=${*:-env build test bench}
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16}
# NVLink multicast stays off on shared hosts.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
declare -a SUMMARY=()
note() { SUMMARY+=("$(printf '%-10s %-6s %s' "$1" "$2" "$3")"); }
has() { [[ " $STAGES " == *" $1 "* ]]; }

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  SITE=${TMPDIR:-/tmp}/afdkit-site
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || { echo "installing carried wheels failed"; exit 1; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

if has env; then
  { nvidia-smi; nvcc --version; cmake --version; python3 -c 'import torch; print("torch", torch.__version__, torch.version.cuda, torch.cuda.device_count())'; } > "$OUT/build.log" 2>&1
  note env ok "$(nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | head -1)"
fi

if has build; then
  t0=$(date +%s)
  if python3 -m pip install --no-build-isolation --no-deps -v . >> "$OUT/build.log" 2>&1; then
    note build ok "$(( $(date +%s) - t0 )) s; $(grep -c 'warning' "$OUT/build.log") warning lines"
  else
    note build FAIL "see build.log"; tail -40 "$OUT/build.log"; printf '%s\n' "${SUMMARY[@]}"; exit 1
  fi
  (cd /tmp && python3 -c 'import afdkit,json; print(json.dumps(afdkit.build_info(), indent=1))') >> "$OUT/build.log" 2>&1
fi

if has test; then
  # GPU_TESTS narrows the run (files or node ids); default: every gpu test.
  python3 -X faulthandler -m pytest -q -ra --timeout=300 -m gpu ${GPU_TESTS:-tests} > "$OUT/pytest_gpu.log" 2>&1
  note gpu-tests "rc=$?" "$(tail -1 "$OUT/pytest_gpu.log")"
fi

if has bench; then
  for b in ${BENCHES:-bench/bench_*.py}; do
    [ -f "$b" ] || continue
    name=$(basename "$b" .py)
    timeout 300 python3 "$b" --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1
    note "$name" "rc=$?" "table in $name.log"
  done
fi

if has harness && [ -f dev/mfa/harness.cu ]; then
  nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -I csrc \
    -o /tmp/mfa_harness dev/mfa/harness.cu csrc/mfa/*.cu csrc/mfa/instantiations/*.cu > "$OUT/harness.log" 2>&1 \
    && timeout 300 /tmp/mfa_harness >> "$OUT/harness.log" 2>&1
  note harness "rc=$?" "$(tail -1 "$OUT/harness.log" 2>/dev/null)"
fi

echo
echo "== gpu_check summary ($(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo none)) =="
printf '%s\n' "${SUMMARY[@]}"
for f in "$OUT"/bench_*.log; do [ -f "$f" ] && { echo "-- $(basename "$f")"; tail -25 "$f"; }; done
