// A minimal copy of the sm90 decode's epilogue hand-over, to tell whether racecheck's
// "RAW hazard" reports on it (bench/results/2026-12-08-h100-mfa-v6-epi-bulk-qearly.md)
// are the tool's or the kernel's. 384 threads like the kernel: warpgroup 0 leaves at
// once (as the loader's idle warps do), warpgroups 1 and 2 run `segments` rounds of the
// kernel's barrier sequence on named barrier 2 over 256 threads: two barriers at the
// segment start, uneven work (consumer 0 runs longer, as when it has the last tile),
// quad-reduced row sums stored by lanes 0 mod 4 into row_ml[c], the exchange barrier,
// then each consumer reads the other's rows and checks the segment stamp. The code has
// no race; a racecheck report on it is the tool's.
//
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a dev/mfa/racecheck_repro.cu -o /tmp/rr
//   /tmp/rr && compute-sanitizer --tool racecheck --racecheck-report all /tmp/rr
#include <cstdio>

#include <cuda_runtime.h>

__device__ __forceinline__ void bar2_256() { asm volatile("bar.sync 2, 256;" ::: "memory"); }

__global__ void __launch_bounds__(384, 1) handover(int segments, int spin, int* mismatches) {
  __shared__ float2 row_ml[2][64];
  if (threadIdx.x < 128) return;
  const int c = threadIdx.x / 128 - 1, t = threadIdx.x % 128, lane = t % 32;
  float acc = static_cast<float>(t);
  for (int s = 1; s <= segments; ++s) {
    bar2_256();  // "both done with the previous Q"
    bar2_256();  // "Q stored"
    for (int i = 0; i < (c == 0 ? 2 * spin : spin); ++i) acc = acc * 0.999f + 1.f;  // the tiles
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float l = acc + i;
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      if (lane % 4 == 0) row_ml[c][(t / 32) * 16 + lane / 4 + 8 * i] = make_float2(static_cast<float>(s), l);
    }
    bar2_256();  // the exchange
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const float2 other = row_ml[c ^ 1][(t / 32) * 16 + lane / 4 + 8 * i];
      if (other.x != static_cast<float>(s)) atomicAdd(mismatches, 1);
      acc += other.y * 1e-9f;
    }
  }
  if (acc == -1.f) atomicAdd(mismatches, 1000000);  // keeps the work
}

int main() {
  int* d = nullptr;
  if (cudaMalloc(&d, sizeof(int)) != cudaSuccess) return 2;
  cudaMemset(d, 0, sizeof(int));
  handover<<<4, 384>>>(8, 2000, d);
  int h = -1;
  cudaMemcpy(&h, d, sizeof(int), cudaMemcpyDeviceToHost);
  const cudaError_t e = cudaGetLastError();
  std::printf("racecheck_repro: %s, %d stale reads\n", e == cudaSuccess ? "ran" : cudaGetErrorString(e), h);
  cudaFree(d);
  return e == cudaSuccess && h == 0 ? 0 : 1;
}
