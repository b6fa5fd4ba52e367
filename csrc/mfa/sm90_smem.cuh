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

// Per-token scales exist only for fp8 caches; the bf16 instance compiles them out.
template <KvDtype kKv>
__device__ __forceinline__ bool per_token_scales(const DecodeParams& p) {
  return Traits<kKv>::kFp8 && p.scale_mode == ScaleMode::kPerToken;
}

// Tile j of a part goes to consumer j % 2. K stages are QK^T operands as they land
// (TMA, 128B swizzle); V has one operand buffer per consumer, converted by that
// consumer from the V ring at the start of its tile.
template <KvDtype kKv>
struct alignas(1024) Smem {
  using Ring = typename Traits<kKv>::Ring;
  uint8_t q[cfg::kOpTileBytes];    // Q * 2^e (per-row power of two): fp8 = e4m3 high term
                                   // (first 16 KB) + low term; bf16 = one bf16 tile. The
                                   // epilogue reuses it to merge the consumers' O halves
  uint8_t v_op[cfg::kVopBuffers][cfg::kOpTileBytes];  // converted V tile of consumer c
  uint8_t raw_k[Ring::kKStages][Ring::kHalfTileBytes];  // K half-tiles, swizzled operand layout
  uint8_t raw_v[Ring::kVStages][Ring::kHalfTileBytes];  // V half-tiles, row-major as in the cache
  // Per-token scales (fp8 caches only; a bf16 cache has none, and its layout has no
  // room for them): K of the tile in raw_k[stage]; V in slot tile % kVScaleSlots.
  static constexpr int kScaleCols = Traits<kKv>::kFp8 ? cfg::kTileN : 1;
  float k_scale[Ring::kKStages][kScaleCols];
  float v_scale[Ring::kVScaleSlots][kScaleCols];
  float row_mult[cfg::kRowsPerCta];  // S accumulator -> log2-domain logit, per row
  float2 row_ml[cfg::kNumConsumerWg][cfg::kRowsPerCta];  // epilogue: (max, sum) per row of consumer c
  uint64_t raw_k_full[Ring::kKStages], raw_k_empty[Ring::kKStages];  // copy (+ scales) -> consumer -> issue
  uint64_t raw_v_full[Ring::kVStages], raw_v_empty[Ring::kVStages];  // copy -> V converter -> issue
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
  int b, seq_len, lo, hi;  // tiles [lo, hi) of sequence b
};

struct Walker {
  int b, b0, t0, b1, t1;
  // The walk in one 16-byte load: as five scalar loads (with the split index, now derived
  // from batch_meta) it took two round trips, ptxas sinking the last three past the
  // empty-part exit.
  __device__ void init(const int32_t* meta) {
    static_assert(cfg::kMetaB0 == 0 && cfg::kMetaT0 == 1 && cfg::kMetaB1 == 2 && cfg::kMetaT1 == 3,
                  "the walk is the row's first 16 bytes");
    const int4 a = __ldg(reinterpret_cast<const int4*>(meta));
    b0 = a.x, t0 = a.y, b1 = a.z, t1 = a.w;
    b = b0;
  }
  __device__ bool done() const { return b > b1; }
  // The segment of sequence b (seq_len = its clamped length), then moves to b + 1.
  __device__ Segment take(int seq_len) {
    Segment s;
    s.b = b;
    s.seq_len = seq_len;
    s.lo = b == b0 ? t0 : 0;
    s.hi = b == b1 ? t1 : cdiv(seq_len, cfg::kTileN);
    ++b;
    return s;
  }
};

// The lengths of a part's sequences b0 .. b1 held across a warp (lane i: b0 + i),
// loaded with one coalesced load at the start: the loader then walks its segments
// without a dependent global load each (one is a round trip behind the whole
// chip's copies in flight, several microseconds under load). Sequences past b0 + 31
// (more than 32 segments in one part) are loaded when reached. All 32 lanes of the
// warp must call get() together.
struct LaneSeqLens {
  int b0, v;
  __device__ void load(const DecodeParams& p, const Walker& w) {
    b0 = w.b0;
    const int b = b0 + static_cast<int>(threadIdx.x % 32);
    v = b <= w.b1 ? max(__ldg(p.seq_lens + b), 0) : 0;
  }
  __device__ int get(const DecodeParams& p, int b) const {
    const int i = b - b0;
    const int from_lane = __shfl_sync(0xffffffffu, v, i & 31);
    return i < 32 ? from_lane : max(__ldg(p.seq_lens + b), 0);
  }
};

// Walks the K and V half-tiles of a part in load order, skipping empty segments.
struct HalfCursor {
  Walker w;
  Segment seg;
  int tile, half;
  bool valid;
  __device__ void init(const int32_t* meta, const DecodeParams& p, LaneSeqLens& lens) {
    w.init(meta);
    lens.load(p, w);
    next_segment(p, lens);
  }
  __device__ void next_segment(const DecodeParams& p, const LaneSeqLens& lens) {
    valid = false;
    while (!w.done()) {
      seg = w.take(lens.get(p, w.b));
      if (seg.lo < seg.hi) {
        tile = seg.lo, half = 0, valid = true;
        return;
      }
    }
  }
  __device__ void next(const DecodeParams& p, const LaneSeqLens& lens) {
    if (half == 0) {
      half = 1;
      return;
    }
    half = 0;
    if (++tile < seg.hi) return;
    next_segment(p, lens);
  }
  __device__ int n_valid() const { return min(cfg::kTileN, seg.seq_len - tile * cfg::kTileN); }
};

}  // namespace afdkit::mfa::sm90
