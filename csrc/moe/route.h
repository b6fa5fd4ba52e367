// MoE routing on one GPU: fused scoring + top-k, and the expert-major permutation
// (with FP8 per-128-channel quantization) that grouped GEMMs read directly, plus its
// weighted inverse. Everything stays on the GPU (counts and offsets included), so a
// decode step with these ops can be captured in a CUDA graph.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/dtype.h"

namespace afdkit::moe {

enum class Scoring : int { kSoftmax = 0, kSigmoid = 1 };

constexpr int kMaxExperts = 512;
constexpr int kMaxTopK = 16;
constexpr int kQuantGroup = 128;

struct RouteParams {
  const void* logits = nullptr;  // [tokens, num_experts], rows contiguous
  DType logits_dtype = DType::kFloat32;
  int64_t logits_row_stride = 0;
  int64_t tokens = 0;
  int num_experts = 0, top_k = 0;
  Scoring scoring = Scoring::kSoftmax;
  bool renormalize = false;
  float* weights = nullptr;  // [tokens, top_k] fp32
  int32_t* ids = nullptr;    // [tokens, top_k] int32, by descending score
};
void route(const RouteParams& p, cudaStream_t stream);

struct PermuteParams {
  const void* x = nullptr;  // [tokens, hidden], rows contiguous
  DType x_dtype = DType::kBFloat16;
  int64_t x_row_stride = 0;
  int64_t tokens = 0, hidden = 0;
  const int32_t* ids = nullptr;  // [tokens, top_k]
  int top_k = 0, num_experts = 0;
  bool quantize = true;          // FP8 e4m3 + per-128-channel scales, else x's dtype
  void* out = nullptr;           // [tokens * top_k, hidden]
  float* out_scales = nullptr;   // [tokens * top_k, hidden / 128] when quantize
  int32_t* expert_counts = nullptr;   // [num_experts]
  int32_t* expert_offsets = nullptr;  // [num_experts + 1], exclusive prefix sums
  int32_t* inverse = nullptr;         // [tokens, top_k]: row of (t, j) in out
  int32_t* cursor_workspace = nullptr;  // [num_experts]
};
void permute(const PermuteParams& p, cudaStream_t stream);

struct UnpermuteParams {
  const void* y = nullptr;  // [tokens * top_k, hidden] bf16 (rows in permuted order)
  int64_t y_row_stride = 0;
  const int32_t* inverse = nullptr;  // [tokens, top_k]
  const float* weights = nullptr;    // [tokens, top_k]
  int64_t tokens = 0, hidden = 0;
  int top_k = 0;
  void* out = nullptr;  // [tokens, hidden] bf16
  int64_t out_row_stride = 0;
};
void unpermute(const UnpermuteParams& p, cudaStream_t stream);

}  // namespace afdkit::moe
