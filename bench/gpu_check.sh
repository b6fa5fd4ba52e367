#!/usr/bin/env bash
# One call on a GPU host: build afdkit, run the GPU tests and the benchmarks, keep
# every log under $OUT (default ./out), and print a short table last.
#
#   bench/gpu_check.sh [STAGE ...]     stages: env build|prebuilt test bench harness sanitize
#                                    (default: env build test bench)
#
# The build stage leaves the wheel and a stamp of the native sources in $OUT/wheel; copy
# them to .whl/prebuilt/ and later runs with the 'prebuilt' stage skip the compile while
# the C++/CUDA sources are unchanged (Python sources are overlaid).
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

# The compiled part depends only on these; a wheel built from the same inputs is reused.
native_stamp() { find csrc CMakeLists.txt pyproject.toml third_party -type f | LC_ALL=C sort | xargs sha1sum | sha1sum | cut -c1-16; }

# prebuilt: install .whl/prebuilt/afdkit-*.whl (a wheel an earlier build stage left in
# $OUT/wheel) when its stamp matches the native sources, then overlay the Python sources;
# anything else falls through to a full build.
if has prebuilt; then
  if [ -f .whl/prebuilt/stamp ] && [ "$(cat .whl/prebuilt/stamp)" = "$(native_stamp)" ] && ls .whl/prebuilt/afdkit-*.whl >/dev/null 2>&1 \
     && python3 -m pip install -q --no-deps --force-reinstall --no-index .whl/prebuilt/afdkit-*.whl >> "$OUT/build.log" 2>&1; then
    PKG=$(cd /tmp && python3 -c 'import afdkit, os; print(os.path.dirname(afdkit.__file__))')
    cp -r python/afdkit/. "$PKG/"
    note build ok "prebuilt wheel (native stamp $(native_stamp)) + Python overlay"
  else
    note prebuilt miss "stamp differs or no wheel: building"
    STAGES="$STAGES build"
  fi
fi

if has build && ! [[ " ${SUMMARY[*]} " == *"prebuilt wheel"* ]]; then
  t0=$(date +%s)
  rm -rf "$OUT/wheel"
  if python3 -m pip wheel --no-build-isolation --no-deps -v -w "$OUT/wheel" . >> "$OUT/build.log" 2>&1 \
     && python3 -m pip install --no-deps --force-reinstall --no-index "$OUT"/wheel/afdkit-*.whl >> "$OUT/build.log" 2>&1; then
    native_stamp > "$OUT/wheel/stamp"
    note build ok "$(( $(date +%s) - t0 )) s; $(grep -c 'warning' "$OUT/build.log") warning lines; wheel in \$OUT/wheel"
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

# The MFA kernel harness, built once per call for the stages that run it.
HARNESS=${TMPDIR:-/tmp}/mfa_harness
harness_built=""
build_harness() {
  [ -n "$harness_built" ] && return "$harness_built"
  nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -I csrc \
    -o "$HARNESS" dev/mfa/harness.cu csrc/mfa/*.cu csrc/mfa/instantiations/*.cu > "$OUT/harness_build.log" 2>&1
  harness_built=$?
  return "$harness_built"
}

if has harness && [ -f dev/mfa/harness.cu ]; then
  build_harness && timeout 300 "$HARNESS" > "$OUT/harness.log" 2>&1
  note harness "rc=$?" "$(tail -1 "$OUT/harness.log" 2>/dev/null || tail -1 "$OUT/harness_build.log")"
fi

# sanitize: compute-sanitizer's memcheck, racecheck (shared memory) and synccheck
# (barriers) on the harness's two small cases; each tool's last line in the summary.
if has sanitize && [ -f dev/mfa/harness.cu ]; then
  if build_harness; then
    for tool in memcheck racecheck synccheck; do
      timeout 300 compute-sanitizer --tool "$tool" "$HARNESS" --small > "$OUT/sanitize_$tool.log" 2>&1
      note "$tool" "rc=$?" "$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitize_$tool.log" | tail -1)"
    done
    # the epilogue's hand-over alone, race-free by construction: a report here is the tool's
    if nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a dev/mfa/racecheck_repro.cu \
         -o "$OUT/racecheck_repro" > "$OUT/sanitize_repro.log" 2>&1; then
      timeout 120 compute-sanitizer --tool racecheck --racecheck-report all "$OUT/racecheck_repro" \
        >> "$OUT/sanitize_repro.log" 2>&1
      note repro "rc=$?" "$(grep -E 'racecheck_repro:|RACECHECK SUMMARY' "$OUT/sanitize_repro.log" | tr '\n' ' ')"
      rm -f "$OUT/racecheck_repro"
    else
      note repro fail "racecheck_repro.cu does not build (sanitize_repro.log)"
    fi
  else
    note sanitize fail "the harness does not build (harness_build.log)"
  fi
fi

echo
echo "== gpu_check summary ($(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo none)) =="
printf '%s\n' "${SUMMARY[@]}"
for f in "$OUT"/bench_*.log; do [ -f "$f" ] && { echo "-- $(basename "$f")"; tail -25 "$f"; }; done
