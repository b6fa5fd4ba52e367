// Host API of the MFA decode kernels: raw device pointers, strides in elements,
// a CUDA stream. Every function enqueues work on `stream` and never synchronizes
// the host. Errors throw afdkit::ValueError (a violated invariant, message names
// it) or afdkit::CudaError (a failed launch), see common/errors.h.
//
// The op, for sequence b, KV head h, query token i (0..q_len-1), query head
// hq = h * G + g (G = num_q_heads / num_kv_heads):
//   visible = seq_lens[b] - (q_len - 1 - i)             (may be <= 0)
//   s_t     = softmax_scale * <q[b,i,hq,:], K_t>       for t < visible
//   out     = sum_t softmax(s)_t V_t ;  lse = log(sum_t exp(s_t))  (natural log)
//   visible <= 0 gives out = 0, lse = -inf.
// K_t / V_t are the cache rows of token t of sequence b: page block_table[b, t / page_size],
// row t % page_size, head h; fp8 rows dequantize as code * scale.
//
// Typical step (graph-capturable, the plan reused by every layer of the step):
//   PlanSizes sz = plan_sizes(batch, q_len, Hq, Hkv, num_sms);   // host, once
//   ...allocate sz.* once...
//   plan(seq_lens, batch, buffers, stream);                         // once per step
//   decode(params, buffers, stream);                                // per layer
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace afdkit::mfa {

enum class KvDtype : int { kFp8E4M3 = 0, kBf16 = 1 };
// kNone: bf16 cache. kPerTensor: k_scale/v_scale point at one float each.
// kPerToken: k_scale/v_scale point at [num_pages, page_size, num_kv_heads] float caches
// (contiguous), the scale of each cached row.
enum class ScaleMode : int { kNone = 0, kPerTensor = 1, kPerToken = 2 };

struct DecodeParams {
  const void* q = nullptr;  // [batch, q_len, num_q_heads, 256] bf16, last dim contiguous
  int64_t q_stride_b = 0, q_stride_t = 0, q_stride_h = 0;
  const void* k_cache = nullptr;  // [num_pages, page_size, num_kv_heads, 256] e4m3 or bf16
  const void* v_cache = nullptr;  // same layout and strides as k_cache
  int64_t kv_stride_page = 0, kv_stride_token = 0, kv_stride_head = 0;
  KvDtype kv_dtype = KvDtype::kFp8E4M3;
  ScaleMode scale_mode = ScaleMode::kPerTensor;
  const float* k_scale = nullptr;  // device pointers (graph-friendly), see ScaleMode
  const float* v_scale = nullptr;
  const int32_t* block_table = nullptr;  // [batch, max_pages_per_seq]
  int64_t block_table_stride = 0;
  int max_pages_per_seq = 0;
  const int32_t* seq_lens = nullptr;  // [batch], include the q tokens; 0 allowed
  int batch = 0, q_len = 1, num_q_heads = 64, num_kv_heads = 1, page_size = 64, num_pages = 0;
  float softmax_scale = 1.0f / 16.0f;
  void* out = nullptr;  // [batch, q_len, num_q_heads, 256] bf16, last dim contiguous
  int64_t out_stride_b = 0, out_stride_t = 0, out_stride_h = 0;
  float* lse = nullptr;  // nullable; [batch, q_len, num_q_heads] fp32, contiguous
};

// Sizes of the split-KV buffers, a function of the shape and the SM count only
// (never of seq_lens), so they can be allocated once per (batch, shape).
struct PlanSizes {
  int num_sm_parts = 0;        // persistent CTAs per (kv head, row block)
  int64_t part_meta_ints = 0;  // int32 elements of PlanBuffers::part_meta
  int64_t batch_meta_ints = 0; // int32 elements of PlanBuffers::batch_meta
  int64_t num_slots = 0;       // partial results the plan may need at most
  int64_t o_partial_floats = 0;   // num_slots * q_len * num_q_heads * 256
  int64_t lse_partial_floats = 0; // num_slots * q_len * num_q_heads
};

// Device buffers of one plan; written by plan(), read by decode().
struct PlanBuffers {
  int32_t* part_meta = nullptr;   // [num_sm_parts, 8]: b0, t0, b1, t1 (tiles of 64), 0 x 4;
                                  // 16-byte aligned
  int32_t* batch_meta = nullptr;  // [batch, 4]: num_splits, first partial slot, first part, 0;
                                  // 16-byte aligned
  int num_sm_parts = 0;
  float* o_partial = nullptr;     // [num_slots, q_len, num_q_heads, 256] fp32 (O / l)
  float* lse_partial = nullptr;   // [num_slots, q_len, num_q_heads] fp32
};

// num_sms: the device's multiprocessor count (cudaDevAttrMultiProcessorCount).
PlanSizes plan_sizes(int batch, int q_len, int num_q_heads, int num_kv_heads, int num_sms);

// Balances sum over sequences of (ceil(seq_len / 64) + 2) tiles over num_sm_parts
// parts; reads seq_lens on the device. Sequences cut between parts are "split".
void plan(const int32_t* seq_lens, int batch, const PlanBuffers& buffers, cudaStream_t stream);

// sm90a path: persistent warp-specialized kernel (TMA bulk copies, mbarrier ring,
// fp16/bf16 wgmma) writing unsplit sequences directly and split ones to the
// partial buffers, then the combine kernel. Requires a plan of the same seq_lens.
void decode(const DecodeParams& p, const PlanBuffers& buffers, cudaStream_t stream);

// Oracle path: fp32 SIMT kernel, one CTA per (sequence, kv head, 16 rows). No plan.
void decode_simt(const DecodeParams& p, cudaStream_t stream);

struct AppendKvParams {
  const void* k = nullptr;  // [num_tokens, num_kv_heads, 256] bf16, last dim contiguous
  const void* v = nullptr;
  int64_t k_stride_t = 0, k_stride_h = 0, v_stride_t = 0, v_stride_h = 0;
  int num_tokens = 0, num_kv_heads = 1;
  const int64_t* slot_mapping = nullptr;  // [num_tokens]: page * page_size + row; < 0 skips
  void* k_cache = nullptr;  // as DecodeParams
  void* v_cache = nullptr;
  int64_t kv_stride_page = 0, kv_stride_token = 0, kv_stride_head = 0;
  int page_size = 64, num_pages = 0;
  KvDtype kv_dtype = KvDtype::kFp8E4M3;
  ScaleMode scale_mode = ScaleMode::kPerTensor;
  // kPerTensor: inputs, one float each; code = sat_e4m3(x / scale) (IEEE division, RNE).
  // kPerToken: outputs, [num_pages, page_size, num_kv_heads] caches (contiguous):
  //   scale = max(amax over the 256 dims, 1e-12) / 448.
  float* k_scale = nullptr;
  float* v_scale = nullptr;
};

// Quantizes (fp8) or copies (bf16) new K/V rows into their cache slots.
void append_kv(const AppendKvParams& p, cudaStream_t stream);

}  // namespace afdkit::mfa
