// The oracle: a plain fp32 SIMT decode kernel with the same parameters as the
// sm90 path. One CTA per (sequence, kv head, 16 rows); 256 threads, one per
// output dim. No TMA, no tensor cores, no split: easy to read, slow on purpose.
//
// Per chunk of 64 tokens: (1) each warp scores 8 tokens against the 16 rows
// (lane = 8 dims, warp-reduced dot products); (2) 16 threads run the online
// softmax of their row over the chunk; (3) every thread updates its dim of the
// 16 output rows.
#include <cuda_bf16.h>

#include "common/cuda_check.h"
#include "mfa/common.cuh"
#include "mfa/launch_checks.h"

namespace afdkit::mfa {
namespace {

constexpr int kRows = cfg::kSimtRows;
constexpr int kChunk = cfg::kSimtChunk;
constexpr int kDim = cfg::kHeadDim;
constexpr int kWarps = cfg::kSimtThreads / 32;

struct SimtSmem {
  float q[kRows][kDim];       // q * softmax_scale, fp32
  float p[kRows][kChunk];     // scores, then probabilities of the chunk
  float m[kRows], l[kRows], alpha[kRows];
  int vis[kRows];             // visible tokens per row (0 for padding rows)
  float k_scale[kChunk], v_scale[kChunk];
  int page[kChunk / 16];      // pages of the chunk (page_size >= 16)
};

__device__ __forceinline__ float load_kv(const DecodeParams& p, const void* cache, int page,
                                         int row, int head, int dim) {
  const int64_t off = page * p.kv_stride_page + row * p.kv_stride_token + head * p.kv_stride_head + dim;
  if (p.kv_dtype == KvDtype::kFp8E4M3) return e4m3_to_float(static_cast<const uint8_t*>(cache)[off]);
  return __bfloat162float(static_cast<const __nv_bfloat16*>(cache)[off]);
}

__device__ void simt_load_q(const DecodeParams& p, SimtSmem& s, int b, int h, int row0) {
  const int G = p.num_q_heads / p.num_kv_heads;
  const int rows = p.q_len * G;
  const int seq_len = p.seq_lens[b];
  for (int r = 0; r < kRows; ++r) {
    const int rg = row0 + r;
    float v = 0.f;
    if (rg < rows) {
      const RowCoord rc = row_coord(rg, G);
      const auto* q = static_cast<const __nv_bfloat16*>(p.q) + b * p.q_stride_b +
                      rc.token * p.q_stride_t + (h * G + rc.head) * p.q_stride_h;
      v = __bfloat162float(q[threadIdx.x]) * p.softmax_scale;
      if (threadIdx.x == 0) s.vis[r] = max(visible_len(seq_len, p.q_len, rc.token), 0);
    } else if (threadIdx.x == 0) {
      s.vis[r] = 0;
    }
    s.q[r][threadIdx.x] = v;
  }
  if (threadIdx.x < kRows) {
    s.m[threadIdx.x] = -INFINITY;
    s.l[threadIdx.x] = 0.f;
  }
}

// Scores of tokens [t0, t0 + n) for all rows into s.p (natural-log units).
__device__ void simt_score_chunk(const DecodeParams& p, SimtSmem& s, int h, int t0, int n) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int t = warp; t < n; t += kWarps) {
    const int tok = t0 + t;
    const int page = s.page[t / 16], row = tok % p.page_size;  // 16 | page_size
    float k[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) k[e] = load_kv(p, p.k_cache, page, row, h, lane * 8 + e) * s.k_scale[t];
    for (int r = 0; r < kRows; ++r) {
      float acc = 0.f;
#pragma unroll
      for (int e = 0; e < 8; ++e) acc += s.q[r][lane * 8 + e] * k[e];
#pragma unroll
      for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
      if (lane == 0) s.p[r][t] = tok < s.vis[r] ? acc : -INFINITY;
    }
  }
}

// Online softmax of one row over the chunk: thread r owns row r.
__device__ void simt_softmax_chunk(SimtSmem& s, int n) {
  const int r = threadIdx.x;
  if (r >= kRows) return;
  float mx = s.m[r];
  for (int t = 0; t < n; ++t) mx = fmaxf(mx, s.p[r][t]);
  const float m_use = mx == -INFINITY ? 0.f : mx;  // a row that sees nothing yet stays 0
  float sum = 0.f;
  for (int t = 0; t < n; ++t) {
    const float e = expf(s.p[r][t] - m_use);
    s.p[r][t] = e;
    sum += e;
  }
  const float alpha = expf(s.m[r] - m_use);
  s.alpha[r] = alpha;
  s.l[r] = s.l[r] * alpha + sum;
  s.m[r] = mx;
}

__global__ void __launch_bounds__(cfg::kSimtThreads) decode_simt_kernel(DecodeParams p) {
  __shared__ SimtSmem s;
  const int b = blockIdx.x, h = blockIdx.y, row0 = blockIdx.z * kRows;
  const int G = p.num_q_heads / p.num_kv_heads;
  const int rows = p.q_len * G;
  const int seq_len = p.seq_lens[b];
  const bool fp8 = p.kv_dtype == KvDtype::kFp8E4M3;
  simt_load_q(p, s, b, h, row0);
  float o[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) o[r] = 0.f;
  const int32_t* table = p.block_table + b * p.block_table_stride;

  for (int t0 = 0; t0 < seq_len; t0 += kChunk) {
    const int n = min(kChunk, seq_len - t0);
    __syncthreads();  // previous chunk fully consumed
    if (threadIdx.x < kChunk / 16) {
      const int t = t0 + threadIdx.x * 16;  // pages start at multiples of 16
      s.page[threadIdx.x] = t < seq_len ? table[t / p.page_size] : 0;
    }
    __syncthreads();
    if (threadIdx.x < n) {
      const int tok = t0 + threadIdx.x;
      const int page = s.page[threadIdx.x / 16], row = tok % p.page_size;
      float ks = 1.f, vs = 1.f;
      if (p.scale_mode == ScaleMode::kPerTensor) {
        ks = *p.k_scale;
        vs = *p.v_scale;
      } else if (p.scale_mode == ScaleMode::kPerToken) {
        const int64_t i = scale_index(page, row, h, p.page_size, p.num_kv_heads);
        ks = p.k_scale[i];
        vs = p.v_scale[i];
      }
      s.k_scale[threadIdx.x] = fp8 ? ks : 1.f;
      s.v_scale[threadIdx.x] = fp8 ? vs : 1.f;
    }
    __syncthreads();
    simt_score_chunk(p, s, h, t0, n);
    __syncthreads();
    simt_softmax_chunk(s, n);
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kRows; ++r) o[r] *= s.alpha[r];
    for (int t = 0; t < n; ++t) {
      const int tok = t0 + t;
      const float v = load_kv(p, p.v_cache, s.page[t / 16], tok % p.page_size, h, threadIdx.x) *
                      s.v_scale[t];
#pragma unroll
      for (int r = 0; r < kRows; ++r) o[r] += s.p[r][t] * v;
    }
  }
  __syncthreads();
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int rg = row0 + r;
    if (rg >= rows) break;
    const RowCoord rc = row_coord(rg, G);
    const int hq = h * G + rc.head;
    const float l = s.l[r];
    auto* out = static_cast<__nv_bfloat16*>(p.out) + b * p.out_stride_b + rc.token * p.out_stride_t +
                hq * p.out_stride_h;
    out[threadIdx.x] = __float2bfloat16(l > 0.f ? o[r] / l : 0.f);
    if (threadIdx.x == 0 && p.lse)
      p.lse[(static_cast<int64_t>(b) * p.q_len + rc.token) * p.num_q_heads + hq] =
          l > 0.f ? s.m[r] + logf(l) : -INFINITY;
  }
}

}  // namespace

void decode_simt(const DecodeParams& p, cudaStream_t stream) {
  detail::check_decode(p, "mfa.decode_simt");
  if (p.batch == 0) return;
  const int rows = p.q_len * (p.num_q_heads / p.num_kv_heads);
  const dim3 grid(p.batch, p.num_kv_heads, cdiv(rows, kRows));
  AFDKIT_CHECK(grid.x <= 0x7fffffffu && grid.y <= 65535 && grid.z <= 65535,
               "mfa.decode_simt: grid too large");
  decode_simt_kernel<<<grid, cfg::kSimtThreads, 0, stream>>>(p);
  AFDKIT_CHECK_LAUNCH();
}

}  // namespace afdkit::mfa
