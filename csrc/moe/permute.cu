// Expert-major permutation (with FP8 per-128-channel quantization) and its weighted
// inverse. Rows of one expert are contiguous and experts follow each other, so
// torch._scaled_grouped_mm reads `out` directly with `expert_offsets[1:]` as offsets.
// The order of rows inside an expert is first-come (atomics); `inverse` records it, so
// values never depend on it.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/cuda_check.h"
#include "moe/route.h"
#include "quant/fp8.cuh"

namespace afdkit::moe {
namespace {

constexpr int kWarp = 32;
constexpr int kBlock = 256;

__global__ void count_kernel(const int32_t* ids, int64_t n, int num_experts, int32_t* counts) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int e = ids[i];
    if (e >= 0 && e < num_experts) atomicAdd(&counts[e], 1);
  }
}

// One block: exclusive prefix sum of <= kMaxExperts counts (a simple two-level scan).
__global__ void offsets_kernel(const int32_t* counts, int num_experts, int32_t* offsets, int32_t* cursor) {
  __shared__ int32_t s[kMaxExperts];
  for (int e = threadIdx.x; e < kMaxExperts; e += blockDim.x) s[e] = e < num_experts ? counts[e] : 0;
  __syncthreads();
  if (threadIdx.x == 0) {
    int32_t run = 0;
    for (int e = 0; e < num_experts; ++e) {
      const int32_t c = s[e];
      s[e] = run;
      run += c;
    }
    offsets[num_experts] = run;
  }
  __syncthreads();
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
    offsets[e] = s[e];
    cursor[e] = s[e];
  }
}

template <class T>
__device__ __forceinline__ float to_f32(T v) { return static_cast<float>(v); }
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
__device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }

// One warp per (token, k): claim a row of the expert, then copy or quantize the token.
template <class T>
__global__ void scatter_kernel(PermuteParams p) {
  const int64_t item = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (item >= p.tokens * p.top_k) return;
  const int64_t token = item / p.top_k;
  const int e = p.ids[item];
  int32_t row = 0;
  if (lane == 0) row = atomicAdd(&p.cursor_workspace[e], 1);
  row = __shfl_sync(0xffffffffu, row, 0);
  if (lane == 0) p.inverse[item] = row;
  const T* src = static_cast<const T*>(p.x) + token * p.x_row_stride;
  if (!p.quantize) {
    T* dst = static_cast<T*>(p.out) + static_cast<int64_t>(row) * p.hidden;
    for (int64_t c = lane; c < p.hidden; c += kWarp) dst[c] = src[c];
    return;
  }
  auto* dst = static_cast<__nv_fp8_storage_t*>(p.out) + static_cast<int64_t>(row) * p.hidden;
  const int64_t groups = p.hidden / kQuantGroup;
  for (int64_t g = 0; g < groups; ++g) {
    float v[kQuantGroup / kWarp];
    float amax = 0.f;
    bool nan = false;
#pragma unroll
    for (int i = 0; i < kQuantGroup / kWarp; ++i) {
      v[i] = to_f32(src[g * kQuantGroup + lane + i * kWarp]);
      nan |= isnan(v[i]);
      amax = fmaxf(amax, fabsf(v[i]));
    }
#pragma unroll
    for (int off = kWarp / 2; off > 0; off /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
    if (__any_sync(0xffffffffu, nan)) amax = __int_as_float(0x7fc00000);
    const float scale = quant::scale_from_amax(amax);
#pragma unroll
    for (int i = 0; i < kQuantGroup / kWarp; ++i) dst[g * kQuantGroup + lane + i * kWarp] = quant::encode_e4m3(v[i], scale);
    if (lane == 0) p.out_scales[static_cast<int64_t>(row) * groups + g] = scale;
  }
}

// One block per token: out[t] = sum_k w[t, k] * y[inverse[t, k]] in fp32, then bf16.
__global__ void unpermute_kernel(UnpermuteParams p) {
  const int64_t token = blockIdx.x;
  const auto* y = static_cast<const __nv_bfloat16*>(p.y);
  auto* out = static_cast<__nv_bfloat16*>(p.out) + token * p.out_row_stride;
  // Shared, not register arrays: top_k is a run-time value.
  __shared__ int32_t rows[kMaxTopK];
  __shared__ float w[kMaxTopK];
  if (threadIdx.x < p.top_k) {
    rows[threadIdx.x] = p.inverse[token * p.top_k + threadIdx.x];
    w[threadIdx.x] = p.weights[token * p.top_k + threadIdx.x];
  }
  __syncthreads();
  for (int64_t c = threadIdx.x; c < p.hidden; c += blockDim.x) {
    float acc = 0.f;
    for (int k = 0; k < p.top_k; ++k) acc += w[k] * __bfloat162float(y[static_cast<int64_t>(rows[k]) * p.y_row_stride + c]);
    out[c] = __float2bfloat16(acc);
  }
}

unsigned blocks_for(int64_t threads) { return static_cast<unsigned>((threads + kBlock - 1) / kBlock); }

}  // namespace

void permute(const PermuteParams& p, cudaStream_t stream) {
  AFDKIT_CHECK(p.num_experts >= 1 && p.num_experts <= kMaxExperts, "permute: num_experts must be in 1..",
               kMaxExperts, ", got ", p.num_experts);
  AFDKIT_CHECK(!p.quantize || p.hidden % kQuantGroup == 0, "permute: FP8 needs hidden % 128 == 0, got ", p.hidden);
  AFDKIT_CUDA_CHECK(cudaMemsetAsync(p.expert_counts, 0, sizeof(int32_t) * p.num_experts, stream));
  const int64_t n = p.tokens * p.top_k;
  if (n > 0) {
    count_kernel<<<blocks_for(n) < 1024 ? blocks_for(n) : 1024, kBlock, 0, stream>>>(p.ids, n, p.num_experts,
                                                                                     p.expert_counts);
    AFDKIT_CHECK_LAUNCH();
  }
  offsets_kernel<<<1, kBlock, 0, stream>>>(p.expert_counts, p.num_experts, p.expert_offsets, p.cursor_workspace);
  AFDKIT_CHECK_LAUNCH();
  if (n == 0) return;
  switch (p.x_dtype) {
    case DType::kBFloat16: scatter_kernel<__nv_bfloat16><<<blocks_for(n * kWarp), kBlock, 0, stream>>>(p); break;
    case DType::kFloat16: scatter_kernel<__half><<<blocks_for(n * kWarp), kBlock, 0, stream>>>(p); break;
    case DType::kFloat32: scatter_kernel<float><<<blocks_for(n * kWarp), kBlock, 0, stream>>>(p); break;
    default: AFDKIT_THROW(TypeError, "permute: unsupported x dtype ", dtype_name(p.x_dtype));
  }
  AFDKIT_CHECK_LAUNCH();
}

void unpermute(const UnpermuteParams& p, cudaStream_t stream) {
  AFDKIT_CHECK(p.top_k >= 1 && p.top_k <= kMaxTopK, "unpermute: top_k must be in 1..", kMaxTopK);
  if (p.tokens == 0) return;
  unpermute_kernel<<<static_cast<unsigned>(p.tokens), kBlock, 0, stream>>>(p);
  AFDKIT_CHECK_LAUNCH();
}

}  // namespace afdkit::moe
