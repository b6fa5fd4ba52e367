// Device helpers shared by the MFA kernels: row mapping, scales, fp8 decoding,
// the final/partial epilogue formulas. Kept tiny so every kernel agrees on them.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "mfa/config.h"
#include "mfa/launch.h"

namespace afdkit::mfa {

__host__ __device__ __forceinline__ int cdiv(int a, int b) { return (a + b - 1) / b; }

// A row of a KV head's query block: rows are token-major, r = i * G + g.
struct RowCoord {
  int token;  // q token i
  int head;   // query head within the kv head's group
};
// r must be < q_len * heads_per_kv (q_len <= cfg::kMaxQLen). Comparisons instead of a
// division: a runtime integer division is a branchy sequence, and eight of them between
// the Q loads of a segment split the code into blocks that ptxas does not hoist the
// segment's other loads across (they then left one round trip after Q).
__device__ __forceinline__ RowCoord row_coord(int r, int heads_per_kv) {
  int token = 0;
#pragma unroll
  for (int i = 1; i < cfg::kMaxQLen; ++i) token += r >= i * heads_per_kv ? 1 : 0;
  return {token, r - token * heads_per_kv};
}

// Tokens visible to q token i: the new tokens are causal among themselves.
__device__ __forceinline__ int visible_len(int seq_len, int q_len, int i) {
  return seq_len - (q_len - 1 - i);
}

__device__ __forceinline__ float e4m3_to_float(uint8_t code) {
  __nv_fp8_e4m3 v;
  v.__x = code;
  return static_cast<float>(v);
}

// Index of the per-token scale of (page, row, head) in a contiguous scale cache.
__device__ __forceinline__ int64_t scale_index(int page, int row, int head, int page_size,
                                               int num_kv_heads) {
  return (static_cast<int64_t>(page) * page_size + row) * num_kv_heads + head;
}

// Merge of partials with natural-log LSEs: weights exp(lse_s - max). All -inf
// (no visible token anywhere) gives 0 and -inf.
__device__ __forceinline__ float lse_or_neg_inf(float m_log2, float l) {
  return l > 0.f ? (m_log2 + log2f(l)) * cfg::kLn2 : -INFINITY;
}

}  // namespace afdkit::mfa
