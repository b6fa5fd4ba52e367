// Warpgroup 0 of the sm90 decode kernel: warp 0 walks the part's tiles and page ids
// and its lane 0 issues the copies of every tile (K through the tensor map, landing
// in the swizzled operand layout; V as bulk copies of the cache's rows) into the K
// and V raw rings; with per-token scales all 128 threads also store the tile's
// scales beside the K stage. The consumers convert V with the convert functions below.
#pragma once
#include <climits>

#include "common/ptx.cuh"
#include "mfa/sm90_profile.cuh"
#include "mfa/sm90_smem.cuh"

namespace afdkit::mfa::sm90 {

constexpr int kMaxPagesPerTile = cfg::kTileN / 16;  // pages of 16, 32 or 64 tokens

// Block-table entries of the part, 32 at a time across warp 0 of the loader (lane i:
// entry base + i of sequence b), with the following window loaded one window ahead:
// a copy never waits for a block-table load (one dependent load per tile was a
// round trip behind all copies in flight, and the first tiles of a part were issued
// one round trip apart). Windows follow the part's pages in issue order: the rest of
// the current sequence's tiles, then the next non-empty segment. All 32 lanes call
// page() together, in the order the tiles are issued.
struct PageWindows {
  struct Window {
    int b, base, ids;  // ids: this lane's entry; b < 0: none
  };
  Window cur, nxt;
  int ppt;  // pages per tile

  __device__ static int load_entry(const DecodeParams& p, int b, int base) {
    const int i = base + static_cast<int>(threadIdx.x % 32);
    return b >= 0 && i < p.max_pages_per_seq ? __ldg(p.block_table + b * p.block_table_stride + i) : 0;
  }
  // Last page + 1 of sequence b's segment in this part.
  __device__ int seg_end(const DecodeParams& p, const Walker& w, const LaneSeqLens& lens, int b) const {
    const int hi = b == w.b1 ? w.t1 : cdiv(lens.get(p, b), cfg::kTileN);
    return hi * ppt;
  }
  __device__ Window successor(const DecodeParams& p, const Walker& w, const LaneSeqLens& lens,
                              const Window& x) const {
    Window n{-1, 0, 0};
    if (x.b < 0) return n;
    if (x.base + 32 < seg_end(p, w, lens, x.b)) {
      n.b = x.b, n.base = x.base + 32;
    } else {
      for (int b = x.b + 1; b <= w.b1; ++b)  // the next segment with tiles (b > b0 starts at page 0)
        if (seg_end(p, w, lens, b) > 0) {
          n.b = b;
          break;
        }
    }
    n.ids = load_entry(p, n.b, n.base);
    return n;
  }
  // The first window starts at the part's first page, (b0, t0): issued before the
  // sequence lengths arrive, so the two loads overlap.
  __device__ void start(const DecodeParams& p, const Walker& w) {
    ppt = cfg::kTileN / p.page_size;
    cur = Window{w.b0, w.t0 * ppt, 0};
    cur.ids = load_entry(p, cur.b, cur.base);
    nxt.b = -2;  // computed once the lengths are known (first page())
  }
  __device__ int page(const DecodeParams& p, const Walker& w, const LaneSeqLens& lens, int b, int i) {
    if (nxt.b == -2) nxt = successor(p, w, lens, cur);
    while (!(b == cur.b && i >= cur.base && i < cur.base + 32) && cur.b >= 0) {
      cur = nxt;
      nxt = successor(p, w, lens, cur);
    }
    return __shfl_sync(0xffffffffu, cur.ids, (i - cur.base) & 31);
  }
  __device__ void pages(const DecodeParams& p, const Walker& w, const LaneSeqLens& lens, const HalfCursor& c,
                        int (&out)[kMaxPagesPerTile]) {
    const int n = cdiv(c.n_valid(), p.page_size);
#pragma unroll
    for (int k = 0; k < kMaxPagesPerTile; ++k) out[k] = k < n ? page(p, w, lens, c.seg.b, c.tile * ppt + k) : 0;
  }
};

// Thread 0: bulk copies of the valid rows of one half-tile into raw stage `stage`.
// A page is one copy when its rows of this head are contiguous (one KV head),
// else one copy per row.
template <KvDtype kKv>
__device__ void issue_half(const DecodeParams& p, const HalfCursor& c, int h, uint8_t* dst, uint64_t* bar,
                           const int (&pages)[kMaxPagesPerTile]) {
  using Tr = Traits<kKv>;
  const int n_valid = c.n_valid();
#ifdef AFDKIT_MFA_DEV_NO_COPY  // bound finding only: the stage completes with no bytes (see docs)
  ptx::mbar_arrive_expect_tx(bar, 0);
  return;
#endif
  ptx::mbar_arrive_expect_tx(bar, static_cast<uint32_t>(n_valid * Tr::kRawRowBytes));
  const auto* base = static_cast<const uint8_t*>(c.half ? p.v_cache : p.k_cache);
  const bool contiguous = p.kv_stride_token == cfg::kHeadDim;
#pragma unroll
  for (int k = 0; k < kMaxPagesPerTile; ++k) {
    const int r0 = k * p.page_size;
    if (r0 >= n_valid) break;
    const int rows = min(p.page_size, n_valid - r0);
    const uint8_t* src = base + (static_cast<int64_t>(pages[k]) * p.kv_stride_page + h * p.kv_stride_head) *
                                    Tr::kKvBytes;
    if (contiguous) {
      ptx::bulk_copy_g2s(dst + r0 * Tr::kRawRowBytes, src, rows * Tr::kRawRowBytes, bar);
    } else {
      for (int r = 0; r < rows; ++r)
        ptx::bulk_copy_g2s(dst + (r0 + r) * Tr::kRawRowBytes, src + r * p.kv_stride_token * Tr::kKvBytes,
                           Tr::kRawRowBytes, bar);
    }
  }
}

// fp8 -> fp16: thread t converts 128 codes of one token row: token
// (t / 16) * 8 + t % 8, dims [128 * ((t / 8) % 2), +128), as eight tasks of 16 codes
// (16 B) -> two 16-byte operand chunks. Within an 8-lane phase the lanes take 8
// different tokens (tok % 8 = lane % 8) and 8 different 16-byte source columns
// (rotated by the lane), so both the raw reads and the swizzled writes hit 8
// distinct bank groups. Reads go in batches of kConvBatch so that several are in
// flight before the first convert (2 at the loader's and consumers' register
// caps); rows past the sequence end (stale or NaN bytes) read as zero codes, which
// convert to +0.
template <int kConvBatch>
__device__ __forceinline__ void convert_half_fp8(const uint8_t* raw, uint8_t* op, int n_valid) {
  const int t = threadIdx.x % cfg::kWarpgroup;
  const int j = t & 7, g8 = t >> 3;  // lane in phase, phase index 0..15
  const int tok = (g8 >> 1) * 8 + j;
  const int colhalf = g8 & 1;        // 16-dim columns [8 * colhalf, 8 * colhalf + 8)
  const bool valid = tok < n_valid;
  const uint8_t* src = raw + tok * cfg::kHeadDim + colhalf * 128;
  uint8_t* dst = op + colhalf * 2 * cfg::kColBlockBytes + tok * cfg::kSwizzleBytes;
#pragma unroll
  for (int b = 0; b < 8; b += kConvBatch) {
    uint4 w[kConvBatch];
#pragma unroll
    for (int u = 0; u < kConvBatch; ++u) {
      const int d8 = (j + b + u) & 7;  // 16-dim column within the half
      w[u] = valid ? *reinterpret_cast<const uint4*>(src + d8 * 16) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kConvBatch; ++u) {
      const int d8 = (j + b + u) & 7;
      // fp16 chunks 2*d8 and 2*d8 + 1 of the half = column block d8 / 4, chunks (2*d8) % 8 and +1
      uint8_t* blk = dst + (d8 >> 2) * cfg::kColBlockBytes;
      const int ch = (2 * d8) & 7;
      uint4 lo, hi;
      ptx::cvt_e4m3x4_f16x4(w[u].x, lo.x, lo.y);
      ptx::cvt_e4m3x4_f16x4(w[u].y, lo.z, lo.w);
      ptx::cvt_e4m3x4_f16x4(w[u].z, hi.x, hi.y);
      ptx::cvt_e4m3x4_f16x4(w[u].w, hi.z, hi.w);
      *reinterpret_cast<uint4*>(blk + ((ch ^ j) << 4)) = lo;
      *reinterpret_cast<uint4*>(blk + (((ch + 1) ^ j) << 4)) = hi;
    }
  }
}

// bf16 -> bf16: a swizzling copy; an 8-lane phase covers 8 chunks of one token.
__device__ __forceinline__ void convert_half_bf16(const uint8_t* raw, uint8_t* op, int n_valid) {
  const int t = threadIdx.x % cfg::kWarpgroup;
  const int j = t & 7, g8 = t >> 3;
#pragma unroll 4
  for (int it = 0; it < 16; ++it) {
    const int pt = g8 * 16 + it;  // 0..255: (token, group of 8 chunks)
    const int tok = pt >> 2, chunk = (pt & 3) * 8 + j;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (tok < n_valid) v = *reinterpret_cast<const uint4*>(raw + tok * 2 * cfg::kHeadDim + chunk * 16);
    *reinterpret_cast<uint4*>(op + op_chunk_offset(tok, chunk)) = v;
  }
}

// Per-token scale of row (tid % 64) of the tile at `c` (K for tid < 64, else V); 0 past the end.
__device__ __forceinline__ float load_token_scale(const DecodeParams& p, const HalfCursor& c, int h) {
  const int t = threadIdx.x % cfg::kTileN;
  const int tok = c.tile * cfg::kTileN + t;
  if (!c.valid || tok >= c.seg.seq_len) return 0.f;
  const int page = p.block_table[c.seg.b * p.block_table_stride + tok / p.page_size];
  const float* scales = threadIdx.x < cfg::kTileN ? p.k_scale : p.v_scale;
  return scales[scale_index(page, tok % p.page_size, h, p.page_size, p.num_kv_heads)];
}

// Thread 0: the K half-tile at `c` as tensor-map boxes (one per page and 128-byte
// column block), straight into the operand layout of raw stage `dst`. Whole pages
// are copied; rows past the sequence end are masked by the softmax (select, so
// stale or NaN bytes there never reach O).
template <KvDtype kKv>
__device__ void issue_k_tma(const DecodeParams& p, const HalfCursor& c, int h, uint8_t* dst, uint64_t* bar,
                            const int (&pages)[kMaxPagesPerTile], const void* k_map) {
  using Tr = Traits<kKv>;
  constexpr int kBlocks = Tr::kRawRowBytes / cfg::kSwizzleBytes;     // 2 fp8, 4 bf16
  constexpr int kBlockElems = cfg::kSwizzleBytes / Tr::kKvBytes;      // 128 fp8, 64 bf16
  const int n_pages = cdiv(c.n_valid(), p.page_size);
#ifdef AFDKIT_MFA_DEV_NO_COPY
  ptx::mbar_arrive_expect_tx(bar, 0);
  return;
#endif
  ptx::mbar_arrive_expect_tx(bar, static_cast<uint32_t>(n_pages * p.page_size * Tr::kRawRowBytes));
#pragma unroll
  for (int k = 0; k < kMaxPagesPerTile; ++k) {
    if (k >= n_pages) break;
#pragma unroll
    for (int cb = 0; cb < kBlocks; ++cb)
      ptx::tma_load_4d(dst + cb * cfg::kColBlockBytes + k * p.page_size * cfg::kSwizzleBytes, k_map,
                       cb * kBlockElems, h, 0, pages[k], bar);
  }
}

// Converts one raw V half-tile (fp8 or bf16) into a swizzled operand tile.
template <KvDtype kKv, int kConvBatch>
__device__ __forceinline__ void convert_half(const uint8_t* raw, uint8_t* op, int n_valid) {
  if constexpr (Traits<kKv>::kFp8) convert_half_fp8<kConvBatch>(raw, op, n_valid);
  else convert_half_bf16(raw, op, n_valid);
}

// Warpgroup 0. Tile t of the part: K into raw_k[t % kKStages] once the consumer of
// tile t - kKStages released it (after its QK^T), V into raw_v[t % kVStages] once
// its consumer converted V(t - kVStages). With per-token scales every thread waits
// for the K stage, stores one scale of the tile (K: threads 0..63, V: 64..127) and
// arrives on raw_k_full, so the consumer sees the scales with the K tile.
template <KvDtype kKv>
__device__ void loader_role(const DecodeParams& p, Smem<kKv>& s, const int32_t* meta, int h, const void* k_map
                                MFA_PROF(, unsigned long long* prof_rec)) {
  using Ring = typename Traits<kKv>::Ring;
  const int tid = threadIdx.x;
  const bool per_token = per_token_scales<kKv>(p);
  const bool issuer = tid < 32;  // warp 0 walks the pages; its lane 0 issues the copies
  if (!per_token && !issuer) return;
  Walker w0;
  w0.init(meta);
  // The first block-table window and the lengths are requested together, right after
  // the metadata: the window's load is unconditional (the per-token threads of warps
  // 1-3 load one they never read) because inside `if (issuer)` ptxas issued it only after
  // it had waited for the lengths, a third round trip before the first copy.
  PageWindows pw;
  pw.start(p, w0);
  if (issuer) ptx::prefetch_tensormap(k_map);
  LaneSeqLens lens;
  HalfCursor cur;
  cur.init(meta, p, lens);
  float scale_next = per_token ? load_token_scale(p, cur, h) : 0.f;
  // (events wait for the value they are about: written only if it is not INT_MIN)
  MFA_PROF(if (tid == 0 && prof_rec && lens.v != INT_MIN) prof_rec[prof::kEvLoaderReady] = prof::gtime();)
  uint32_t t = 0;
  MFA_PROF(uint32_t pa[5] = {}; uint32_t mark = prof::clk();)
  while (cur.valid) {
    const int ks = t % Ring::kKStages, vs = t % Ring::kVStages;
    if (t >= Ring::kKStages) ptx::mbar_wait(&s.raw_k_empty[ks], ((t / Ring::kKStages) & 1) ^ 1);
    MFA_PROF_LAP(pa, prof::kLdWaitKFree - prof::kLdWaitKFree, mark);
    if (per_token) {
      HalfCursor ahead = cur;
      ahead.next(p, lens);
      ahead.next(p, lens);
      const float scale = scale_next;
      scale_next = load_token_scale(p, ahead, h);
      if (tid < cfg::kTileN) s.k_scale[ks][tid] = scale;
      else s.v_scale[t % Ring::kVScaleSlots][tid - cfg::kTileN] = scale;
      ptx::mbar_arrive(&s.raw_k_full[ks]);
    }
    MFA_PROF_LAP(pa, prof::kLdScales - prof::kLdWaitKFree, mark);
    if (issuer) {
      int pages[kMaxPagesPerTile];
      pw.pages(p, cur.w, lens, cur, pages);
      MFA_PROF(if (tid == 0 && t == 0 && prof_rec && pages[0] != INT_MIN) prof_rec[prof::kEvPagesReady] = prof::gtime();)
      MFA_PROF(s.prof_issue[ks] = prof::clk();)
      if (tid == 0) issue_k_tma<kKv>(p, cur, h, s.raw_k[ks], &s.raw_k_full[ks], pages, k_map);
      MFA_PROF(if (tid == 0 && t == 0 && prof_rec) prof_rec[prof::kEvKIssued] = prof::gtime();)
      cur.next(p, lens);
      MFA_PROF_LAP(pa, prof::kLdIssue - prof::kLdWaitKFree, mark);
      if (t >= Ring::kVStages) ptx::mbar_wait(&s.raw_v_empty[vs], ((t / Ring::kVStages) & 1) ^ 1);
      MFA_PROF_LAP(pa, prof::kLdWaitVFree - prof::kLdWaitKFree, mark);
      if (tid == 0) issue_half<kKv>(p, cur, h, s.raw_v[vs], &s.raw_v_full[vs], pages);
      MFA_PROF(if (tid == 0 && t == 0 && prof_rec) prof_rec[prof::kEvFirstIssue] = prof::gtime();)
      cur.next(p, lens);
      MFA_PROF_LAP(pa, prof::kLdIssue - prof::kLdWaitKFree, mark);
    } else {
      cur.next(p, lens);
      cur.next(p, lens);
    }
    ++t;
  }
#ifdef AFDKIT_MFA_PROFILE
  if (tid == 0 && prof_rec) {
    prof_rec[prof::kT1Loader] = prof::gtime();
    prof_rec[prof::kSmid] = prof::smid();
    prof_rec[prof::kHalves] = t;
    for (int i = 0; i < 5; ++i) prof_rec[prof::kLdWaitKFree + i] = pa[i];
  }
#endif
}

}  // namespace afdkit::mfa::sm90
