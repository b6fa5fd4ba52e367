// FP8 quantization kernels. Bandwidth-bound and small: the point is a correct,
// stream-ordered kernel behind the DLPack boundary that later parts reuse
// (MoE dispatch quantizes per 128 channels; KV append per tensor or per token).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include "common/cuda_check.h"
#include "common/errors.h"
#include "quant/fp8.cuh"
#include "quant/quantize.h"

namespace afdkit::quant {
namespace {

constexpr int kWarp = 32;
constexpr int kBlock = 256;

template <class T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// One warp per (row, group): pass 1 finds the group's amax, pass 2 re-reads the
// group (an L1 hit) and encodes it.
template <class T>
__global__ void quantize_groups_kernel(QuantizeParams p, int64_t group_cols, int64_t groups_per_row) {
  const int64_t warp_id = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (warp_id >= p.rows * groups_per_row) return;
  const int64_t row = warp_id / groups_per_row, group = warp_id % groups_per_row;
  const T* x = static_cast<const T*>(p.x) + row * p.x_row_stride + group * group_cols;
  auto* q = static_cast<__nv_fp8_storage_t*>(p.q) + row * p.q_row_stride + group * group_cols;

  float amax = 0.f;
  bool has_nan = false;
  for (int64_t c = lane; c < group_cols; c += kWarp) {
    float v = to_float(x[c]);
    has_nan |= isnan(v);
    amax = fmaxf(amax, fabsf(v));
  }
  amax = warp_max(amax);
  if (__any_sync(0xffffffffu, has_nan)) amax = __int_as_float(0x7fc00000);
  const float scale = scale_from_amax(amax);
  for (int64_t c = lane; c < group_cols; c += kWarp) q[c] = encode_e4m3(to_float(x[c]), scale);
  if (lane == 0) p.scale[row * p.scale_row_stride + group] = scale;
}

// Per-tensor amax: non-negative floats order like their bit patterns, so an
// integer atomicMax on the bits is an exact float max (NaN's bits exceed +inf's).
template <class T>
__global__ void tensor_amax_kernel(QuantizeParams p) {
  float amax = 0.f;
  const int64_t n = p.rows * p.cols;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / p.cols, c = i % p.cols;
    float v = fabsf(to_float(static_cast<const T*>(p.x)[r * p.x_row_stride + c]));
    amax = isnan(v) ? v : fmaxf(amax, v);
    if (isnan(v)) break;
  }
  // Warp max that keeps NaN: compare bit patterns as unsigned integers.
  unsigned bits = __float_as_uint(amax);
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) bits = max(bits, __shfl_xor_sync(0xffffffffu, bits, off));
  if (threadIdx.x % kWarp == 0) atomicMax(reinterpret_cast<unsigned*>(p.amax_workspace), bits);
}

template <class T>
__global__ void quantize_tensor_kernel(QuantizeParams p) {
  const float scale = p.static_scale ? *p.scale : scale_from_amax(*p.amax_workspace);
  const int64_t n = p.rows * p.cols;
  if (!p.static_scale && blockIdx.x == 0 && threadIdx.x == 0) *p.scale = scale;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / p.cols, c = i % p.cols;
    const T v = static_cast<const T*>(p.x)[r * p.x_row_stride + c];
    static_cast<__nv_fp8_storage_t*>(p.q)[r * p.q_row_stride + c] = encode_e4m3(to_float(v), scale);
  }
}

int grid_for(int64_t threads_needed) {
  const int64_t blocks = (threads_needed + kBlock - 1) / kBlock;
  return static_cast<int>(blocks < 4096 ? (blocks > 0 ? blocks : 1) : 4096);
}

template <class T>
void launch(const QuantizeParams& p, cudaStream_t stream) {
  if (p.granularity == Granularity::kTensor) {
    if (!p.static_scale) {
      AFDKIT_CUDA_CHECK(cudaMemsetAsync(p.amax_workspace, 0, sizeof(float), stream));
      tensor_amax_kernel<T><<<grid_for(p.rows * p.cols), kBlock, 0, stream>>>(p);
      AFDKIT_CHECK_LAUNCH();
    }
    quantize_tensor_kernel<T><<<grid_for(p.rows * p.cols), kBlock, 0, stream>>>(p);
    AFDKIT_CHECK_LAUNCH();
    return;
  }
  const int64_t group_cols = p.granularity == Granularity::kToken ? p.cols : kChannelGroup;
  const int64_t groups_per_row = p.cols / group_cols;
  const int64_t warps = p.rows * groups_per_row;
  const int64_t blocks = (warps * kWarp + kBlock - 1) / kBlock;
  quantize_groups_kernel<T><<<static_cast<unsigned>(blocks), kBlock, 0, stream>>>(p, group_cols, groups_per_row);
  AFDKIT_CHECK_LAUNCH();
}

}  // namespace

void quantize_fp8(const QuantizeParams& p, cudaStream_t stream) {
  AFDKIT_CHECK(p.rows >= 0 && p.cols >= 0, "quantize_fp8: negative shape");
  if (p.rows == 0 || p.cols == 0) return;
  AFDKIT_CHECK(p.granularity != Granularity::kChannel128 || p.cols % kChannelGroup == 0,
               "quantize_fp8: per-128-channel scales need cols % 128 == 0, got ", p.cols);
  AFDKIT_CHECK(p.granularity != Granularity::kTensor || p.static_scale || p.amax_workspace,
               "quantize_fp8: dynamic per-tensor scaling needs an amax workspace");
  switch (p.x_dtype) {
    case DType::kFloat32: return launch<float>(p, stream);
    case DType::kFloat16: return launch<__half>(p, stream);
    case DType::kBFloat16: return launch<__nv_bfloat16>(p, stream);
    default: AFDKIT_THROW(TypeError, "quantize_fp8: unsupported input dtype ", dtype_name(p.x_dtype));
  }
}

}  // namespace afdkit::quant
