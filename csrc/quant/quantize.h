// FP8 e4m3 quantization (per tensor, per token, per token and 128 channels).
// Convention, shared bit-for-bit with afdkit.reference.quantize_fp8:
//   amax  = max |x| over the group (fp32)
//   scale = (amax < 1e-12 ? 1e-12 : amax) / 448            (fp32, IEEE division)
//   code  = e4m3(x / scale), round to nearest even, saturating to +-448
// so that x ~= code * scale. A caller-given per-tensor scale skips the amax pass.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/dtype.h"

namespace afdkit::quant {

enum class Granularity : int { kTensor = 0, kToken = 1, kChannel128 = 2 };

constexpr int kChannelGroup = 128;
constexpr float kE4M3Max = 448.0f;
constexpr float kMinAmax = 1e-12f;

struct QuantizeParams {
  const void* x = nullptr;  // [rows, cols], cols contiguous
  DType x_dtype = DType::kBFloat16;
  int64_t rows = 0, cols = 0;
  int64_t x_row_stride = 0;  // elements
  void* q = nullptr;         // [rows, cols] e4m3, cols contiguous
  int64_t q_row_stride = 0;
  // kTensor: [1]; kToken: [rows]; kChannel128: [rows, cols / 128] (row stride given)
  float* scale = nullptr;
  int64_t scale_row_stride = 0;
  Granularity granularity = Granularity::kTensor;
  bool static_scale = false;    // kTensor only: *scale is an input
  float* amax_workspace = nullptr;  // kTensor dynamic: one float of device memory
};

// Enqueues the quantization on `stream`; never synchronizes the host.
void quantize_fp8(const QuantizeParams& p, cudaStream_t stream);

}  // namespace afdkit::quant
