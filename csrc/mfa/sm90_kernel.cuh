// The sm90a MFA decode kernel: a persistent CTA per (plan part, kv head, 64-row
// block), 3 warpgroups over one shared-memory layout:
//   WG0  loader: warp 0 walks pages, its lane 0 issues the copies (K through a tensor map into the
//        swizzled operand layout, V as bulk row copies); per-token scales
//   WG1, WG2  consumers: convert their V, QK^T on K in place, PV, online softmax, epilogue
// Pipeline objects: raw_k_full/raw_v_full[stage] (copy -> consumer of the tile),
// raw_k_empty (the consumer's 4 warps after QK^T -> issue), raw_v_empty (the
// consumer's 128 threads after converting V -> issue). Tile j of a part goes to
// consumer j % 2. See docs/mfa-decode.md.
#pragma once
#include <cuda.h>
#include <cudaTypedefs.h>

#include <algorithm>

#include "common/cuda_check.h"
#include "common/ptx.cuh"
#include "mfa/launch_checks.h"
#include "mfa/sm90_consumer.cuh"
#include "mfa/sm90_loader.cuh"
#include "mfa/sm90_profile.cuh"
#include "mfa/sm90_smem.cuh"

namespace afdkit::mfa::sm90 {

// Where a segment's rows go, loaded at the segment's start (see consumer_role): < 0 =
// the sequence is unsplit (bf16 out and lse), else its partial slot: batch_meta's first
// slot + this part's split index (the part's index - the sequence's first part).
__device__ __forceinline__ int64_t load_segment_slot(const PlanBuffers& pb, int b) {
  const int4 bm = __ldg(reinterpret_cast<const int4*>(pb.batch_meta + b * cfg::kBatchMetaInts));
  const int splits = bm.x, first_slot = bm.y, first_part = bm.z;
  return splits > 1 ? static_cast<int64_t>(first_slot) + (static_cast<int>(blockIdx.x) - first_part) : -1;
}

// A float that reads as 1 where a per-tensor scale is not given (see CallScales).
static __device__ const float kUnitScale = 1.f;

// The per-call factors of the consumers, loaded once with the part's metadata and
// without a branch (a scale pointer or kUnitScale): as conditional loads inside the
// segment loop, ptxas issued the K scale's after the segment's first Q use, one more
// round trip before Q could be stored.
struct CallScales {
  float q_mult;      // S accumulator -> log2-domain logit, before the per-row Q factor
  float final_mult;  // per-tensor V scale, or undoes the per-token P shift
  __device__ void load(const DecodeParams& p) {
    const bool per_tensor = p.scale_mode == ScaleMode::kPerTensor;
    const float ks = __ldg(per_tensor ? p.k_scale : &kUnitScale);
    const float vs = __ldg(per_tensor ? p.v_scale : &kUnitScale);
    q_mult = p.softmax_scale * cfg::kLog2e * ks;
    final_mult = p.scale_mode == ScaleMode::kPerToken ? 1.f / cfg::kPerTokenVShift : vs;
  }
};

// (max, sum) of consumer c's rows for the epilogue's merge.
template <KvDtype kKv>
__device__ __forceinline__ float2* row_ml(Smem<kKv>& s, int c) {
  return s.row_ml[c];
}

// Epilogue, stores straight from the registers: 32 eight-byte stores per thread (each
// warp instruction covers 8 rows x 32 B), the lse of each row by consumer 0.
__device__ __forceinline__ void write_rows_direct(const DecodeParams& p, const PlanBuffers& pb, const Segment& seg,
                                                  int64_t slot, const float (&mine)[64], const float (&inv_sum)[2],
                                                  const float (&m_merged)[2], const float (&l_merged)[2], int c, int h,
                                                  int rb MFA_PROF(, unsigned long long* prof_ev)) {
  const int t = threadIdx.x % cfg::kWarpgroup, lane = t % 32, q = lane % 4;
  const int G = p.num_q_heads / p.num_kv_heads, rows = p.q_len * G;
  MFA_PROF(if (threadIdx.x == cfg::kWarpgroup && prof_ev && mine[0] != __int_as_float(0x7fc1a5a5))
               prof_ev[prof::kEvEpiStores] = prof::gtime();)
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int rg = rb * cfg::kRowsPerCta + (t / 32) * 16 + lane / 4 + 8 * i;
    if (rg >= rows) continue;
    const RowCoord rc = row_coord(rg, G);
    const int hq = h * G + rc.head;
    const float inv = inv_sum[i];
    const float lse = lse_or_neg_inf(m_merged[i], l_merged[i]);
    const int64_t row_idx = (static_cast<int64_t>(seg.b) * p.q_len + rc.token) * p.num_q_heads + hq;
    const int dim0 = c * cfg::kMergeDims + 2 * q;
    if (slot < 0) {
      auto* out = static_cast<__nv_bfloat16*>(p.out) + seg.b * p.out_stride_b + rc.token * p.out_stride_t +
                  hq * p.out_stride_h + dim0;
#pragma unroll
      for (int n = 0; n < 16; ++n)
        *reinterpret_cast<__nv_bfloat162*>(out + 8 * n) =
            __floats2bfloat162_rn(mine[4 * n + 2 * i] * inv, mine[4 * n + 2 * i + 1] * inv);
      if (c == 0 && q == 0 && p.lse) p.lse[row_idx] = lse;
    } else {
      const int64_t prow = (slot * p.q_len + rc.token) * p.num_q_heads + hq;
      float* out = pb.o_partial + prow * cfg::kHeadDim + dim0;
#pragma unroll
      for (int n = 0; n < 16; ++n)
        *reinterpret_cast<float2*>(out + 8 * n) = make_float2(mine[4 * n + 2 * i] * inv, mine[4 * n + 2 * i + 1] * inv);
      if (c == 0 && q == 0) pb.lse_partial[prow] = lse;
    }
  }
}

// Epilogue of a segment with one exchange: consumer c's o[0] holds the dims it finishes,
// [128c, 128c + 128), and o[1] the other consumer's (see mma_pv). Each hands its o[1]
// over unscaled through its own V operand tile (its last PV has been waited for; the
// next segment converts V only after the barrier at the top of the segment loop, which
// the other consumer reaches after its reads below) together with its rows' (max, sum);
// after one barrier each merges o[0] * own + other * other_mult. (The three-round
// exchange through the Q tile that this replaced, 8c9da0c, needed three barriers.)
template <KvDtype kKv>
__device__ void epilogue(const DecodeParams& p, const PlanBuffers& pb, Smem<kKv>& s, const Segment& seg,
                         int64_t slot, float final_mult, const RowState& rs, float (&o)[2][64], int c, int h,
                         int rb MFA_PROF(, unsigned long long* prof_ev)) {
  const int t = threadIdx.x % cfg::kWarpgroup, lane = t % 32;
  float l_own[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float l = rs.l[i];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    l_own[i] = l;
    if (lane % 4 == 0) row_ml(s, c)[(t / 32) * 16 + lane / 4 + 8 * i] = make_float2(rs.m[i], l);
  }
  float4* give = reinterpret_cast<float4*>(s.v_op[c]);  // [16][128 threads] float4 = 32 KB
#pragma unroll
  for (int k4 = 0; k4 < 16; ++k4)
    give[k4 * cfg::kWarpgroup + t] = make_float4(o[1][4 * k4], o[1][4 * k4 + 1], o[1][4 * k4 + 2], o[1][4 * k4 + 3]);
  ptx::named_bar_sync(2, 2 * cfg::kWarpgroup);
  MFA_PROF(if (threadIdx.x == cfg::kWarpgroup && prof_ev) prof_ev[prof::kEvEpiBothIn] = prof::gtime();)
  float own_mult[2], other_mult[2], inv_sum[2], m_merged[2], l_merged[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float2 other = row_ml(s, c ^ 1)[(t / 32) * 16 + lane / 4 + 8 * i];
    const float m = fmaxf(rs.m[i], other.x);
    const float m_use = m == -INFINITY ? 0.f : m;
    own_mult[i] = ptx::ex2_approx(rs.m[i] - m_use);
    other_mult[i] = ptx::ex2_approx(other.x - m_use);
    const float l = l_own[i] * own_mult[i] + other.y * other_mult[i];
    m_merged[i] = m, l_merged[i] = l;
    inv_sum[i] = l > 0.f ? final_mult / l : 0.f;
  }
  const float4* take = reinterpret_cast<const float4*>(s.v_op[c ^ 1]);
#pragma unroll
  for (int k4 = 0; k4 < 16; ++k4) {
    const float4 x = take[k4 * cfg::kWarpgroup + t];
    o[0][4 * k4] = o[0][4 * k4] * own_mult[0] + x.x * other_mult[0];
    o[0][4 * k4 + 1] = o[0][4 * k4 + 1] * own_mult[0] + x.y * other_mult[0];
    o[0][4 * k4 + 2] = o[0][4 * k4 + 2] * own_mult[1] + x.z * other_mult[1];
    o[0][4 * k4 + 3] = o[0][4 * k4 + 3] * own_mult[1] + x.w * other_mult[1];
  }
  write_rows_direct(p, pb, seg, slot, o[0], inv_sum, m_merged, l_merged, c, h, rb MFA_PROF(, prof_ev));
}

// Consumer c's V of part-global tile j: wait for the copy, convert it into
// v_op[c], release the raw stage, and make the writes visible to this
// warpgroup's wgmma (fence per thread, then a barrier of the warpgroup).
template <KvDtype kKv>
__device__ __forceinline__ void convert_own_v(Smem<kKv>& s, int c, uint32_t j, int n_valid
                                              MFA_PROF(, uint32_t (&pc)[prof::kConsSlots], uint32_t& mark)) {
  using Ring = typename Traits<kKv>::Ring;
  const int vs = j % Ring::kVStages;
  ptx::mbar_wait(&s.raw_v_full[vs], (j / Ring::kVStages) & 1);
  MFA_PROF_LAP(pc, prof::kWaitV, mark);
  convert_half<kKv, 2>(s.raw_v[vs], s.v_op[c], n_valid);
  ptx::mbar_arrive(&s.raw_v_empty[vs]);
  ptx::fence_proxy_async_smem();
  ptx::named_bar_sync(4 + c, cfg::kWarpgroup);
  MFA_PROF_LAP(pc, prof::kConvV, mark);
}

// One tile of this consumer (part-global tile j, j % 2 == c): convert its V; S on
// the K stage in place (per-token K scales applied), release the K stage; softmax
// and O rescale; P fragments, PV.
template <KvDtype kKv>
__device__ __forceinline__ void consume_tile(const DecodeParams& p, Smem<kKv>& s, RowState& rs, const Segment& seg,
                                             int c, int tile, uint32_t j, float (&o)[2][64]
                                                 MFA_PROF(, uint32_t (&pc)[prof::kConsSlots], uint32_t& mark,
                                                          unsigned long long* prof_ev)) {
  using Ring = typename Traits<kKv>::Ring;
  const int ks = j % Ring::kKStages;
#ifdef AFDKIT_MFA_DEV_NO_MATH  // bound finding only: take the tile's copies and release them (see docs)
  ptx::mbar_wait(&s.raw_v_full[j % Ring::kVStages], (j / Ring::kVStages) & 1);
  ptx::mbar_arrive(&s.raw_v_empty[j % Ring::kVStages]);
  ptx::mbar_wait(&s.raw_k_full[ks], (j / Ring::kKStages) & 1);
  __syncwarp();
  if (threadIdx.x % 32 == 0) ptx::mbar_arrive(&s.raw_k_empty[ks]);
  return;
#endif
  convert_own_v(s, c, j, min(cfg::kTileN, seg.seq_len - tile * cfg::kTileN) MFA_PROF(, pc, mark));
  MFA_PROF(if (j == 0 && threadIdx.x == cfg::kWarpgroup && prof_ev) prof_ev[prof::kEvFirstVConv] = prof::gtime();)
  float acc[32];
  ptx::mbar_wait(&s.raw_k_full[ks], (j / Ring::kKStages) & 1);
  MFA_PROF_LAP(pc, prof::kWaitK, mark);
  MFA_PROF(if (j == 0 && threadIdx.x == cfg::kWarpgroup && prof_ev) prof_ev[prof::kEvFirstK] = prof::gtime();)
  mma_qk(s, ks, acc);
  if (per_token_scales<kKv>(p)) scale_k_columns(s, ks, acc);
  __syncwarp();
  if (threadIdx.x % 32 == 0) ptx::mbar_arrive(&s.raw_k_empty[ks]);
  MFA_PROF_LAP(pc, prof::kQk, mark);
  float alpha[2];
  softmax_tile(p, s, rs, tile, acc, alpha);
  MFA_PROF_LAP(pc, prof::kSoftmax, mark);
  rescale_o(o, alpha);
  MFA_PROF_LAP(pc, prof::kRescale, mark);
  uint32_t pf[4][4];
  make_p_frags(p, s, j % Ring::kVScaleSlots, acc, pf);
  mma_pv(s, c, pf, o);
  MFA_PROF_LAP(pc, prof::kPv, mark);
}

template <KvDtype kKv>
__device__ void consumer_role(const DecodeParams& p, const PlanBuffers& pb, Smem<kKv>& s, const int32_t* meta,
                              int h, int rb MFA_PROF(, unsigned long long* prof_rec)) {
  const int c = threadIdx.x / cfg::kWarpgroup - 1;
  const int t = threadIdx.x % cfg::kWarpgroup;
  const int G = p.num_q_heads / p.num_kv_heads, rows = p.q_len * G;
  CallScales scales;
  scales.load(p);
  Walker w;
  w.init(meta);
  // An empty part leaves here. The test reads the scales too: ptxas sinks a load past an
  // early exit that does not need it, and the K scale's load then left a round trip
  // after the metadata's. (A part with no work and NaN-patterned scales just runs the
  // empty loop below.)
  if (w.done() && __float_as_uint(scales.q_mult) != 0xffffffffu && __float_as_uint(scales.final_mult) != 0xffffffffu)
    return;
  MFA_PROF(if (threadIdx.x == cfg::kWarpgroup && prof_rec && w.b1 >= -1) prof_rec[prof::kEvConsMeta] = prof::gtime();)
  uint32_t tile_idx = 0;
  MFA_PROF(uint32_t pc[prof::kConsSlots] = {}; uint32_t mark = prof::clk();)
  // Every global value a segment needs is loaded at its start, together: Q (this
  // thread's eight 16-byte pieces), the split slot, the scales, this sequence's length
  // (first segment only) and the next one's. Loaded where first used, each would be
  // one more round trip behind every copy in flight (several microseconds under load).
  // Q of segment i + 1 is prefetched into L2 when segment i starts.
  int next_len = 0;
  for (bool first = true; !w.done(); first = false) {
    MFA_PROF(mark = prof::clk(); ++pc[prof::kSegments];)
    const int b = w.b;
    // The scalars before Q in the source: ptxas keeps the order of these independent
    // loads, and with Q first it put the first use of Q (waiting for all eight pieces)
    // before the scalar loads, a second round trip per segment start.
    const int len = first ? max(__ldg(p.seq_lens + b), 0) : next_len;
    next_len = b < w.b1 ? max(__ldg(p.seq_lens + b + 1), 0) : 0;
    const int64_t slot = load_segment_slot(pb, b);
    QRegs qr;
    fetch_q<kKv>(p, G, b, h, rb, qr);
    const Segment seg = w.take(len);
    // (the event waits for the loaded value: it is written only if the piece is not
    // this one bit pattern, which a bf16 pair of Q never has to be)
    MFA_PROF(if (first && threadIdx.x == cfg::kWarpgroup && prof_rec && qr.v[0].x != 0x7fc17fc1u)
                 prof_rec[prof::kEvQLoaded] = prof::gtime();)
    MFA_PROF(if (first && threadIdx.x == cfg::kWarpgroup && prof_rec && qr.v[7].x != 0x7fc17fc1u)
                 prof_rec[prof::kEvQAll] = prof::gtime();)
    ptx::named_bar_sync(2, 2 * cfg::kWarpgroup);  // both done with the previous Q and row_mult
    MFA_PROF(if (first && threadIdx.x == cfg::kWarpgroup && prof_rec) prof_rec[prof::kEvQBarrier] = prof::gtime();)
    store_q(p, s, rb, qr, scales.q_mult);
    ptx::fence_proxy_async_smem();
    ptx::named_bar_sync(2, 2 * cfg::kWarpgroup);
    MFA_PROF(if (first && threadIdx.x == cfg::kWarpgroup && prof_rec) prof_rec[prof::kEvQStored] = prof::gtime();)
    MFA_PROF(if (pc[prof::kSegments] == 2 && threadIdx.x == cfg::kWarpgroup && prof_rec)
                 prof_rec[prof::kEvB1QStored] = prof::gtime();)
    if (!w.done()) prefetch_q(p, G, w.b, h, rb);
    RowState rs;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int r = (t / 32) * 16 + (t % 32) / 4 + 8 * i;
      const int rg = rb * cfg::kRowsPerCta + r;
      rs.m[i] = -INFINITY;
      rs.l[i] = 0.f;
      rs.vis[i] = rg < rows ? max(visible_len(seg.seq_len, p.q_len, rg / G), 0) : 0;
    }
    float o[2][64];
#pragma unroll
    for (int k = 0; k < 64; ++k) o[0][k] = 0.f, o[1][k] = 0.f;
    MFA_PROF_LAP(pc, prof::kQload, mark);
    for (int tile = seg.lo; tile < seg.hi; ++tile, ++tile_idx) {
      if ((tile_idx & 1) != static_cast<uint32_t>(c)) continue;
      consume_tile(p, s, rs, seg, c, tile, tile_idx, o MFA_PROF(, pc, mark, prof_rec));
      MFA_PROF(++pc[prof::kTiles];)
      MFA_PROF(if (pc[prof::kSegments] == 2 && threadIdx.x == cfg::kWarpgroup && prof_rec &&
                   prof_rec[prof::kEvB1Tile] == 0 && o[0][0] != __int_as_float(0x7fc1a5a5))
                   prof_rec[prof::kEvB1Tile] = prof::gtime();)
    }
    MFA_PROF(mark = prof::clk(); if (threadIdx.x == cfg::kWarpgroup && prof_rec) prof_rec[prof::kEvEpilogue] = prof::gtime();)
    // (a CTA's first boundary: each consumer's epilogue start, then consumer 0's copies
    // of the last-epilogue events, which the next segments overwrite)
    MFA_PROF(const bool boundary = pc[prof::kSegments] == 1 && !w.done() && prof_rec;
             if (boundary && t == 0) prof_rec[c == 0 ? prof::kEvB0Epi0 : prof::kEvB0Epi1] = prof::gtime();)
    epilogue<kKv>(p, pb, s, seg, slot, scales.final_mult, rs, o, c, h, rb MFA_PROF(, prof_rec));
    MFA_PROF(if (boundary && threadIdx.x == cfg::kWarpgroup) {
      prof_rec[prof::kEvB0End] = prof::gtime();
      prof_rec[prof::kEvB0BothIn] = prof_rec[prof::kEvEpiBothIn];
      prof_rec[prof::kEvB0Stores] = prof_rec[prof::kEvEpiStores];
    })
    MFA_PROF_LAP(pc, prof::kEpilogue, mark);
  }
#ifdef AFDKIT_MFA_PROFILE
  if (t == 0 && prof_rec) {
    prof_rec[prof::kT1Cons0 + c] = prof::gtime();
    for (int i = 0; i < prof::kConsSlots; ++i) prof_rec[prof::kCons + c * prof::kConsSlots + i] = pc[i];
  }
#endif
}

template <KvDtype kKv>
__global__ void __launch_bounds__(cfg::kThreads, 1)
    decode_sm90_kernel(const __grid_constant__ DecodeParams p, const __grid_constant__ PlanBuffers pb,
                       const __grid_constant__ CUtensorMap k_map MFA_PROF(, const __grid_constant__ prof::Args pa)) {
  extern __shared__ uint8_t smem_raw[];
  // Offset the array itself (not an integer address) so the compiler keeps the
  // shared address space and emits LDS/STS instead of generic loads/stores.
  const uint32_t pad = (1024u - (ptx::smem_addr(smem_raw) & 1023u)) & 1023u;
  auto& s = *reinterpret_cast<Smem<kKv>*>(smem_raw + pad);
  using Ring = typename Traits<kKv>::Ring;
  const int nrb = cdiv(p.q_len * (p.num_q_heads / p.num_kv_heads), cfg::kRowsPerCta);
  const int h = blockIdx.y / nrb, rb = blockIdx.y % nrb;
  const int32_t* meta = pb.part_meta + blockIdx.x * cfg::kPartMetaInts;
#ifdef AFDKIT_MFA_PROFILE
  unsigned long long* prof_rec =
      pa.buf ? pa.buf + (static_cast<size_t>(blockIdx.y) * gridDim.x + blockIdx.x) * prof::kRecordSlots : nullptr;
  if (threadIdx.x == 0 && prof_rec) prof_rec[prof::kT0] = prof::gtime();
#endif
  if (threadIdx.x == 0) {
    // The K tensor map's descriptor first: it depends on nothing, and the first K copy
    // cannot start before the copy engine has it (the loader used to prefetch it only
    // after its part's metadata had arrived).
    ptx::prefetch_tensormap(&k_map);
    // raw_k_full: thread 0's expect_tx, plus one arrival per loader thread when it
    // publishes per-token scales with the stage.
    const uint32_t k_full_count = 1 + (per_token_scales<kKv>(p) ? cfg::kWarpgroup : 0);
    for (int st = 0; st < Ring::kKStages; ++st) {
      ptx::mbar_init(&s.raw_k_full[st], k_full_count);
      ptx::mbar_init(&s.raw_k_empty[st], cfg::kWarpgroup / 32);  // the 4 warps of the tile's consumer
    }
    for (int st = 0; st < Ring::kVStages; ++st) {
      ptx::mbar_init(&s.raw_v_full[st], 1);
      ptx::mbar_init(&s.raw_v_empty[st], cfg::kWarpgroup);  // the 128 threads that convert V
    }
    ptx::fence_mbar_init();
  }
  __syncthreads();
  if (threadIdx.x < cfg::kWarpgroup) {
    ptx::setmaxnreg_dec<cfg::kLoaderRegs>();
    loader_role<kKv>(p, s, meta, h, &k_map MFA_PROF(, prof_rec));
  } else {
    ptx::setmaxnreg_inc<cfg::kConsumerRegs>();
    consumer_role<kKv>(p, pb, s, meta, h, rb MFA_PROF(, prof_rec));
  }
}

// Host side: the K cache as a 4-D tensor map {dims, kv head, token in page, page}
// (innermost first) whose box is one 128-byte column block of one page of one
// head, written with the 128B swizzle the QK^T descriptors expect. Encoding is a
// host-only computation (no driver call that touches the device), so it runs per
// launch and is captured by value in CUDA graphs.
template <KvDtype kKv>
CUtensorMap make_k_tensor_map(const DecodeParams& p) {
  using Tr = Traits<kKv>;
  static PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult q{};
    AFDKIT_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &q));
    AFDKIT_CHECK(fn && q == cudaDriverEntryPointSuccess, "mfa.decode: the driver has no cuTensorMapEncodeTiled");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(cfg::kHeadDim), static_cast<cuuint64_t>(p.num_kv_heads),
                              static_cast<cuuint64_t>(p.page_size),
                              static_cast<cuuint64_t>(std::max(p.num_pages, 1))};  // 0 pages: nothing is read
  const cuuint64_t strides[3] = {static_cast<cuuint64_t>(p.kv_stride_head) * Tr::kKvBytes,
                                 static_cast<cuuint64_t>(p.kv_stride_token) * Tr::kKvBytes,
                                 static_cast<cuuint64_t>(p.kv_stride_page) * Tr::kKvBytes};
  const cuuint32_t box[4] = {static_cast<cuuint32_t>(cfg::kSwizzleBytes / Tr::kKvBytes), 1,
                             static_cast<cuuint32_t>(p.page_size), 1};
  const cuuint32_t elem_strides[4] = {1, 1, 1, 1};
  CUtensorMap map;
  const CUresult r = encode(&map, Tr::kFp8 ? CU_TENSOR_MAP_DATA_TYPE_UINT8 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 4,
                            const_cast<void*>(p.k_cache), dims, strides, box, elem_strides,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  AFDKIT_CHECK(r == CUDA_SUCCESS, "mfa.decode: cannot describe the K cache to the copy engine (cuTensorMapEncodeTiled error ",
               static_cast<int>(r), "); the cache must be 16-byte aligned with 16-byte multiple strides");
  return map;
}

// Host side: one instantiation per KV dtype (instantiations/*.cu).
template <KvDtype kKv>
void launch_decode_sm90(const DecodeParams& p, const PlanBuffers& pb, cudaStream_t stream) {
  constexpr int kSmem = smem_bytes<kKv>();
  int device = 0;
  AFDKIT_CUDA_CHECK(cudaGetDevice(&device));
  static bool attr_set[64] = {};  // per device: the attribute is per function and context
  if (device < 0 || device >= 64 || !attr_set[device]) {
    AFDKIT_CUDA_CHECK(cudaFuncSetAttribute(decode_sm90_kernel<kKv>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
    if (device >= 0 && device < 64) attr_set[device] = true;
  }
  const int nrb = cdiv(p.q_len * (p.num_q_heads / p.num_kv_heads), cfg::kRowsPerCta);
  const dim3 grid(pb.num_sm_parts, p.num_kv_heads * nrb);
  AFDKIT_CHECK(grid.y <= 65535, "mfa.decode: num_kv_heads x row blocks too large (", grid.y, ")");
  const CUtensorMap k_map = make_k_tensor_map<kKv>(p);
  decode_sm90_kernel<kKv><<<grid, cfg::kThreads, kSmem, stream>>>(p, pb, k_map MFA_PROF(, prof::Args{prof::buffer()}));
  AFDKIT_CHECK_LAUNCH();
}

}  // namespace afdkit::mfa::sm90
