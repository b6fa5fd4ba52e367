// Shared-memory layout, work walkers and operand-tile addressing of the sm90
// decode kernel (see docs/mfa-decode.md for the pipeline).
//
// Operand tiles (Q, K, V) are 64 rows x 256 fp16/bf16 in four 64-column blocks
// of 8 KB; each block is rows of 128 B with the 128B swizzle (16-byte chunk c of
// row r stored at chunk c ^ (r % 8)). The same tile is K-major for Q/K (rows = M/N)
// and N-major for V (rows = tokens = K), so one writer serves all three.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "mfa/common.cuh"
#include "mfa/config.h"

namespace afdkit::mfa::sm90 {

template <KvDtype kKv>
struct Traits {
  static constexpr bool kFp8 = kKv == KvDtype::kFp8E4M3;
  using Op = std::conditional_t<kFp8, __half, __nv_bfloat16>;  // wgmma operand type
  static constexpr int kKvBytes = kFp8 ? 1 : 2;
  using Ring = cfg::RawRing<kKvBytes>;
  static constexpr int kRawRowBytes = cfg::kHeadDim * kKvBytes;
};

// Tile j of a part goes to consumer j % 2. K has one operand buffer (QK^T is
// short, so the loader rarely waits for it); V has one per consumer, converted by
// that consumer from the V ring at the start of its tile.
template <KvDtype kKv>
struct alignas(1024) Smem {
  using Ring = typename Traits<kKv>::Ring;
  uint8_t q[cfg::kOpTileBytes];    // Q * 2^e (per-row power of two), operand type; the
                                   // epilogue reuses it to merge the consumers' O halves
  uint8_t k_op[cfg::kOpTileBytes]; // converted K tile (k_full[j % 2] / k_empty)
  uint8_t v_op[cfg::kVopBuffers][cfg::kOpTileBytes];  // converted V tile of consumer c;
                                   // its epilogue parks (max, sum) per row at the front
  uint8_t raw_k[Ring::kKStages][Ring::kHalfTileBytes];  // bulk-copy ring of K half-tiles
  uint8_t raw_v[Ring::kVStages][Ring::kHalfTileBytes];  // ... of V half-tiles
  float k_scale[cfg::kTileN];      // per-token scales of the tile in k_op
  float v_scale[cfg::kVopBuffers][2][cfg::kTileN];  // ... of consumer c's tiles, by (j / 2) % 2
  float row_mult[cfg::kRowsPerCta];  // S accumulator -> log2-domain logit, per row
  uint64_t raw_k_full[Ring::kKStages], raw_k_empty[Ring::kKStages];  // copy -> loader -> issue
  uint64_t raw_v_full[Ring::kVStages], raw_v_empty[Ring::kVStages];  // copy -> consumer -> issue
  uint64_t k_full[cfg::kNumConsumerWg], k_empty;
#ifdef AFDKIT_MFA_PROFILE
  uint32_t prof_issue[Ring::kKStages];  // %clock when each K stage's copy was issued
#endif
};

constexpr int kMaxDynSmem = 227 * 1024;  // sm_90 opt-in limit per block
template <KvDtype kKv>
constexpr int smem_bytes() {
  return static_cast<int>(sizeof(Smem<kKv>)) + 1024;  // + manual 1024-byte alignment
}
static_assert(smem_bytes<KvDtype::kFp8E4M3>() <= kMaxDynSmem, "fp8 layout over 227 KB");
static_assert(smem_bytes<KvDtype::kBf16>() <= kMaxDynSmem, "bf16 layout over 227 KB");
static_assert(offsetof(Smem<KvDtype::kFp8E4M3>, raw_k) % 1024 == 0 && offsetof(Smem<KvDtype::kFp8E4M3>, raw_v) % 1024 == 0,
              "raw ring alignment");

// Byte offset of the 16-byte chunk `chunk` (0..31 along 256 dims) of row `row`.
__device__ __forceinline__ uint32_t op_chunk_offset(int row, int chunk) {
  return (chunk >> 3) * cfg::kColBlockBytes + row * cfg::kSwizzleBytes + (((chunk & 7) ^ (row & 7)) << 4);
}

// ---- the work of one part: consecutive (sequence, tile range) segments ---------
struct Segment {
  int b, seq_len, lo, hi, split;  // tiles [lo, hi) of sequence b; split index of this part
};

struct Walker {
  int b, b0, t0, s0, b1, t1;
  __device__ void init(const int32_t* meta) {
    b0 = meta[0], t0 = meta[1], s0 = meta[2], b1 = meta[3], t1 = meta[4];
    b = b0;
  }
  __device__ bool next(const DecodeParams& p, Segment& s) {
    if (b > b1) return false;
    s.b = b;
    s.seq_len = max(p.seq_lens[b], 0);
    s.lo = b == b0 ? t0 : 0;
    s.hi = b == b1 ? t1 : cdiv(s.seq_len, cfg::kTileN);
    s.split = b == b0 ? s0 : 0;
    ++b;
    return true;
  }
};

// Walks the K and V half-tiles of a part in load order, skipping empty segments.
struct HalfCursor {
  Walker w;
  Segment seg;
  int tile, half;
  bool valid;
  __device__ void init(const int32_t* meta, const DecodeParams& p) {
    w.init(meta);
    next_segment(p);
  }
  __device__ void next_segment(const DecodeParams& p) {
    valid = false;
    while (w.next(p, seg)) {
      if (seg.lo < seg.hi) {
        tile = seg.lo, half = 0, valid = true;
        return;
      }
    }
  }
  __device__ void next(const DecodeParams& p) {
    if (half == 0) {
      half = 1;
      return;
    }
    half = 0;
    if (++tile < seg.hi) return;
    next_segment(p);
  }
  __device__ int n_valid() const { return min(cfg::kTileN, seg.seq_len - tile * cfg::kTileN); }
};

}  // namespace afdkit::mfa::sm90
