// Fused router scoring + top-k: one warp per token. Step-3 routes 48 experts with
// softmax top-3, so a token's logits fit in two registers per lane.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/cuda_check.h"
#include "moe/route.h"

namespace afdkit::moe {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;
constexpr int kPerLane = kMaxExperts / kWarp;

template <class T>
__device__ __forceinline__ float load_f32(const T* p) { return static_cast<float>(*p); }
template <>
__device__ __forceinline__ float load_f32<__nv_bfloat16>(const __nv_bfloat16* p) { return __bfloat162float(*p); }
template <>
__device__ __forceinline__ float load_f32<__half>(const __half* p) { return __half2float(*p); }

// Warp argmax; ties go to the lower expert id so that the result is deterministic.
__device__ __forceinline__ void warp_argmax(float& v, int& idx) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) {
    float ov = __shfl_xor_sync(0xffffffffu, v, off);
    int oi = __shfl_xor_sync(0xffffffffu, idx, off);
    if (ov > v || (ov == v && oi < idx)) {
      v = ov;
      idx = oi;
    }
  }
}

template <class T>
__global__ void route_kernel(RouteParams p) {
  const int64_t token = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (token >= p.tokens) return;
  const T* row = static_cast<const T*>(p.logits) + token * p.logits_row_stride;
  float score[kPerLane];
  float row_max = -INFINITY;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int e = lane + i * kWarp;
    score[i] = e < p.num_experts ? load_f32(row + e) : -INFINITY;
    row_max = fmaxf(row_max, score[i]);
  }
  if (p.scoring == Scoring::kSoftmax) {
#pragma unroll
    for (int off = kWarp / 2; off > 0; off /= 2) row_max = fmaxf(row_max, __shfl_xor_sync(0xffffffffu, row_max, off));
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      score[i] = lane + i * kWarp < p.num_experts ? expf(score[i] - row_max) : 0.f;
      sum += score[i];
    }
#pragma unroll
    for (int off = kWarp / 2; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) score[i] = lane + i * kWarp < p.num_experts ? score[i] / sum : -INFINITY;
  } else {
#pragma unroll
    for (int i = 0; i < kPerLane; ++i)
      score[i] = lane + i * kWarp < p.num_experts ? 1.f / (1.f + expf(-score[i])) : -INFINITY;
  }
  float picked_sum = 0.f, picked_w = 0.f;
  for (int k = 0; k < p.top_k; ++k) {
    float best = -INFINITY;
    int best_e = INT32_MAX;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int e = lane + i * kWarp;
      if (score[i] > best || (score[i] == best && e < best_e)) {
        best = score[i];
        best_e = e;
      }
    }
    warp_argmax(best, best_e);
    // The owner lane retires the winner so that the next round finds the runner-up.
#pragma unroll
    for (int i = 0; i < kPerLane; ++i)
      if (lane + i * kWarp == best_e) score[i] = -INFINITY;
    picked_sum += best;
    if (lane == k) picked_w = best;
    if (lane == 0) p.ids[token * p.top_k + k] = best_e;
  }
  if (lane < p.top_k) p.weights[token * p.top_k + lane] = p.renormalize ? picked_w / picked_sum : picked_w;
}

}  // namespace

void route(const RouteParams& p, cudaStream_t stream) {
  AFDKIT_CHECK(p.num_experts >= 1 && p.num_experts <= kMaxExperts, "route: num_experts must be in 1..",
               kMaxExperts, ", got ", p.num_experts);
  AFDKIT_CHECK(p.top_k >= 1 && p.top_k <= p.num_experts && p.top_k <= kMaxTopK && p.top_k <= kWarp,
               "route: top_k must be in 1..min(num_experts, ", kMaxTopK, "), got ", p.top_k);
  if (p.tokens == 0) return;
  const unsigned blocks = static_cast<unsigned>((p.tokens + kWarpsPerBlock - 1) / kWarpsPerBlock);
  switch (p.logits_dtype) {
    case DType::kFloat32: route_kernel<float><<<blocks, kWarpsPerBlock * kWarp, 0, stream>>>(p); break;
    case DType::kBFloat16: route_kernel<__nv_bfloat16><<<blocks, kWarpsPerBlock * kWarp, 0, stream>>>(p); break;
    case DType::kFloat16: route_kernel<__half><<<blocks, kWarpsPerBlock * kWarp, 0, stream>>>(p); break;
    default: AFDKIT_THROW(TypeError, "route: unsupported logits dtype ", dtype_name(p.logits_dtype));
  }
  AFDKIT_CHECK_LAUNCH();
}

}  // namespace afdkit::moe
