// Host-side invariants the MFA kernels rely on. Python validates user input
// first; these checks catch a wrong binding or a direct C++ caller with a clear
// message instead of a wrong answer or an illegal address.
#pragma once
#include <cstdint>

#include "common/errors.h"
#include "mfa/config.h"
#include "mfa/launch.h"

namespace afdkit::mfa::detail {

inline int kv_bytes(KvDtype t) { return t == KvDtype::kFp8E4M3 ? 1 : 2; }

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// plan() writes and the decode kernel reads part_meta / batch_meta rows as 16-byte pieces.
inline void check_plan_meta_aligned(const PlanBuffers& pb, const char* op) {
  AFDKIT_CHECK(aligned16(pb.part_meta) && aligned16(pb.batch_meta), op,
               ": part_meta and batch_meta must be 16-byte aligned (their rows are read in 16-byte pieces)");
}

inline void check_decode(const DecodeParams& p, const char* op) {
  AFDKIT_CHECK(p.batch >= 0, op, ": batch must be >= 0, got ", p.batch);
  AFDKIT_CHECK(p.q_len >= 1 && p.q_len <= cfg::kMaxQLen, op, ": q_len must be in 1..",
               cfg::kMaxQLen, ", got ", p.q_len);
  AFDKIT_CHECK(p.num_kv_heads >= 1 && p.num_q_heads % p.num_kv_heads == 0 &&
                   (p.num_q_heads / p.num_kv_heads) % cfg::kHeadGroupUnit == 0,
               op, ": num_q_heads (", p.num_q_heads, ") must be a multiple of 16 x num_kv_heads (",
               p.num_kv_heads, ")");
  AFDKIT_CHECK(p.page_size == 16 || p.page_size == 32 || p.page_size == 64, op,
               ": page_size must be 16, 32 or 64, got ", p.page_size);
  AFDKIT_CHECK(p.max_pages_per_seq >= 0 && p.num_pages >= 0, op, ": negative page counts");
  const bool fp8 = p.kv_dtype == KvDtype::kFp8E4M3;
  AFDKIT_CHECK(fp8 == (p.scale_mode != ScaleMode::kNone), op,
               ": scale_mode must be kNone exactly for a bf16 cache");
  AFDKIT_CHECK(!fp8 || (p.k_scale && p.v_scale), op, ": fp8 cache needs k_scale and v_scale");
  if (p.batch == 0) return;
  AFDKIT_CHECK(p.q && p.k_cache && p.v_cache && p.block_table && p.seq_lens && p.out, op,
               ": null device pointer among q, k_cache, v_cache, block_table, seq_lens, out");
  const int eb = kv_bytes(p.kv_dtype);
  // TMA bulk copies move 16-byte aligned rows of 256 elements.
  AFDKIT_CHECK(aligned16(p.k_cache) && aligned16(p.v_cache) && (p.kv_stride_page * eb) % 16 == 0 &&
                   (p.kv_stride_token * eb) % 16 == 0 && (p.kv_stride_head * eb) % 16 == 0,
               op, ": the KV caches and their strides must be 16-byte aligned");
  AFDKIT_CHECK(aligned16(p.q) && (p.q_stride_b % 8) == 0 && (p.q_stride_t % 8) == 0 &&
                   (p.q_stride_h % 8) == 0,
               op, ": q and its strides must be 16-byte aligned");
  AFDKIT_CHECK(reinterpret_cast<uintptr_t>(p.out) % 4 == 0 && p.out_stride_b % 2 == 0 &&
                   p.out_stride_t % 2 == 0 && p.out_stride_h % 2 == 0,
               op, ": out and its strides must be 4-byte aligned");
}

}  // namespace afdkit::mfa::detail
