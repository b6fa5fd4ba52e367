// Warpgroup 0 of the sm90 decode kernel: thread 0 issues the bulk copies of K/V
// half-tiles (pages picked from the block table) into the K and V raw rings; all
// 128 threads convert each K half-tile into the swizzled fp16/bf16 operand tile
// the consumers' wgmma reads, then publish it with fence.proxy.async + mbarrier.
// The consumers convert their own V tiles with the same convert functions.
#pragma once
#include "common/ptx.cuh"
#include "mfa/sm90_profile.cuh"
#include "mfa/sm90_smem.cuh"

namespace afdkit::mfa::sm90 {

// Page ids of the tile at `c` (at most 4: pages of 16, 32 or 64 tokens), read from
// the block table one half-tile before issue_half needs them, so the copy issue
// does not wait on a dependent global load.
constexpr int kMaxPagesPerTile = cfg::kTileN / 16;
__device__ __forceinline__ void load_pages(const DecodeParams& p, const HalfCursor& c,
                                           int (&pages)[kMaxPagesPerTile]) {
  const int n_valid = c.n_valid();
  const int32_t* table = p.block_table + c.seg.b * p.block_table_stride + c.tile * (cfg::kTileN / p.page_size);
#pragma unroll
  for (int k = 0; k < kMaxPagesPerTile; ++k)
    pages[k] = k * p.page_size < min(n_valid, cfg::kTileN) ? __ldg(table + k) : 0;
}

// Thread 0: bulk copies of the valid rows of one half-tile into raw stage `stage`.
// A page is one copy when its rows of this head are contiguous (one KV head),
// else one copy per row.
template <KvDtype kKv>
__device__ void issue_half(const DecodeParams& p, const HalfCursor& c, int h, uint8_t* dst, uint64_t* bar,
                           const int (&pages)[kMaxPagesPerTile]) {
  using Tr = Traits<kKv>;
  const int n_valid = c.n_valid();
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

// Both halves of one tile, in the order K then V, into the stages of part-global
// tile `t` of the two rings. A stage used before is refilled only once its last
// reader released it: the loader's 128 threads for K, the tile's consumer for V.
template <KvDtype kKv>
__device__ void issue_tile(const DecodeParams& p, Smem<kKv>& s, HalfCursor& c, int h, uint32_t t,
                           int (&pages)[kMaxPagesPerTile]) {
  using Ring = typename Traits<kKv>::Ring;
  const int ks = t % Ring::kKStages, vs = t % Ring::kVStages;
  if (t >= Ring::kKStages) ptx::mbar_wait(&s.raw_k_empty[ks], ((t / Ring::kKStages) & 1) ^ 1);
  MFA_PROF(s.prof_issue[ks] = prof::clk();)
  issue_half<kKv>(p, c, h, s.raw_k[ks], &s.raw_k_full[ks], pages);
  c.next(p);
  if (t >= Ring::kVStages) ptx::mbar_wait(&s.raw_v_empty[vs], ((t / Ring::kVStages) & 1) ^ 1);
  issue_half<kKv>(p, c, h, s.raw_v[vs], &s.raw_v_full[vs], pages);
  c.next(p);
  if (c.valid) load_pages(p, c, pages);  // the next tile's pages, used one step later
}

// Converts one raw half-tile (K or V, fp8 or bf16) into a swizzled operand tile.
template <KvDtype kKv, int kConvBatch>
__device__ __forceinline__ void convert_half(const uint8_t* raw, uint8_t* op, int n_valid) {
  if constexpr (Traits<kKv>::kFp8) convert_half_fp8<kConvBatch>(raw, op, n_valid);
  else convert_half_bf16(raw, op, n_valid);
}

// Warpgroup 0: converts the K half of every tile of the part into k_op and stores
// the tile's per-token scales (K in k_scale, V in v_scale of the tile's consumer);
// thread 0 also issues every copy, kAhead tiles ahead of the conversion.
template <KvDtype kKv>
__device__ void loader_role(const DecodeParams& p, Smem<kKv>& s, const int32_t* meta, int h
                                MFA_PROF(, unsigned long long* prof_rec)) {
  using Ring = typename Traits<kKv>::Ring;
  const int tid = threadIdx.x;
  const bool per_token = p.scale_mode == ScaleMode::kPerToken;
  HalfCursor conv, issue;
  conv.init(meta, p);
  int pages[kMaxPagesPerTile];  // thread 0: pages of the issue cursor's tile
  uint32_t issued = 0;          // thread 0: tiles issued so far
  if (tid == 0) {
    issue = conv;
    if (issue.valid) load_pages(p, issue, pages);
    for (; issue.valid && issued < static_cast<uint32_t>(Ring::kAhead); ++issued)
      issue_tile(p, s, issue, h, issued, pages);
  }
  // Per-token scales run one tile ahead: loaded at tile j - 1, stored at tile j.
  float scale_next = per_token ? load_token_scale(p, conv, h) : 0.f;
  float scale_cur = 0.f;
  uint32_t tile_idx = 0;
  MFA_PROF(uint32_t pa[5] = {}; uint32_t mark = prof::clk();)
  while (conv.valid) {
    const int ks = tile_idx % Ring::kKStages;
    const int c = tile_idx & 1;  // consumer of this tile
    if (per_token) {
      HalfCursor ahead = conv;
      ahead.next(p);
      ahead.next(p);
      scale_cur = scale_next;
      scale_next = load_token_scale(p, ahead, h);
    }
    const int n_valid = conv.n_valid();
    ptx::mbar_wait(&s.raw_k_full[ks], (tile_idx / Ring::kKStages) & 1);
    MFA_PROF(pa[4] += prof::clk() - s.prof_issue[ks];)
    MFA_PROF_LAP(pa, 0, mark);
    ptx::mbar_wait(&s.k_empty, (tile_idx & 1) ^ 1);
    MFA_PROF_LAP(pa, 1, mark);
    convert_half<kKv, 1>(s.raw_k[ks], s.k_op, n_valid);
    if (per_token) {
      // v_scale[c][(j / 2) % 2] was last read at tile j - 4, which consumer c finished
      // before its QK^T of tile j - 2, which step j - 1 of this loop waited for.
      if (tid < cfg::kTileN) s.k_scale[tid] = scale_cur;
      else s.v_scale[c][(tile_idx >> 1) & 1][tid - cfg::kTileN] = scale_cur;
    }
    ptx::fence_proxy_async_smem();  // generic writes -> wgmma (async proxy) reads
    ptx::mbar_arrive(&s.k_full[c]);
    MFA_PROF_LAP(pa, 2, mark);
    ptx::mbar_arrive(&s.raw_k_empty[ks]);  // this thread is done reading raw_k[ks]
    if (tid == 0 && issue.valid) issue_tile(p, s, issue, h, issued++, pages);
    MFA_PROF_LAP(pa, 3, mark);
    ++tile_idx;
    conv.next(p);
    conv.next(p);
  }
#ifdef AFDKIT_MFA_PROFILE
  if (tid == 0 && prof_rec) {
    prof_rec[prof::kT1Loader] = prof::gtime();
    prof_rec[prof::kSmid] = prof::smid();
    prof_rec[prof::kHalves] = tile_idx;
    for (int i = 0; i < 5; ++i) prof_rec[prof::kLdWaitRaw + i] = pa[i];
  }
#endif
}

}  // namespace afdkit::mfa::sm90
