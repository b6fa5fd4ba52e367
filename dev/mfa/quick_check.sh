#!/usr/bin/env bash
# Dev loop on a GPU host: harness correctness (--no-time), timing, and the phase profile; logs under $OUT.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
F="-std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -I csrc"
S="dev/mfa/harness.cu csrc/mfa/*.cu csrc/mfa/instantiations/*.cu"
mkdir -p build
nvcc $F $S -o build/h > $OUT/harness.log 2>&1 || { tail $OUT/harness.log; exit 1; }
timeout 60 build/h --no-time >> $OUT/harness.log 2>&1; rc=$?; echo "no-time rc=$rc"; grep -E "PASS|FAIL" $OUT/harness.log | tail -16
[ $rc -eq 0 ] || { tail -5 $OUT/harness.log; exit 1; }
timeout 150 build/h > $OUT/harness_time.log 2>&1; echo "time rc=$?"; tail -25 $OUT/harness_time.log
nvcc $F -DAFDKIT_MFA_PROFILE $S -o build/hp >/dev/null 2>&1 && timeout 90 build/hp --profile > $OUT/profile.log 2>&1; echo "prof rc=$?"; grep -A4 "== profile" $OUT/profile.log
# Where the sm90 kernels touch local memory (spills), with the instructions before each access.
if command -v cuobjdump >/dev/null; then
  cuobjdump -sass build/h 2>/dev/null | awk '/Function : .*decode_sm90_kernel/ {f=$0; on=1} /Function : / && !/decode_sm90_kernel/ {on=0}
    on { buf[NR%6]=$0; if ($0 ~ /(STL|LDL)/) { print "-- " f; for (i=NR-5;i<=NR;i++) if (i in buf) print buf[i%6] } }' > $OUT/spills.log
  echo "local-memory accesses in decode_sm90: $(grep -c -E 'STL|LDL' $OUT/spills.log)"
fi
