// The sm90a MFA decode kernel: a persistent CTA per (plan part, kv head, 64-row
// block), 3 warpgroups over one shared-memory layout:
//   WG0  loader: bulk copies K/V half-tiles, converts K to swizzled fp16/bf16
//   WG1, WG2  consumers: convert their V, QK^T and PV on wgmma, online softmax, epilogue
// Pipeline objects: raw_k_full/raw_v_full[stage] (copy -> converter),
// raw_k_empty/raw_v_empty[stage] (converter threads -> copy issue), k_full[c]
// (loader -> consumer c, 128 arrivals), k_empty (consumer -> loader, one per
// consumer warp). Tile j of a part goes to consumer j % 2. See docs/mfa-decode.md.
#pragma once
#include "common/cuda_check.h"
#include "common/ptx.cuh"
#include "mfa/launch_checks.h"
#include "mfa/sm90_consumer.cuh"
#include "mfa/sm90_loader.cuh"
#include "mfa/sm90_profile.cuh"
#include "mfa/sm90_smem.cuh"

namespace afdkit::mfa::sm90 {

// (max, sum) of consumer c's rows, parked at the front of its V operand tile
// during the epilogue: its last PV has completed, and it converts V again only
// after the barrier at the top of the next segment, when both have read it.
template <KvDtype kKv>
__device__ __forceinline__ float2* row_ml(Smem<kKv>& s, int c) {
  return reinterpret_cast<float2*>(s.v_op[c]);
}

// Epilogue of a segment: merges the two consumers' (max, sum, O) per row through
// shared memory and writes the rows -- bf16 output and lse when the sequence is
// unsplit, else fp32 O / l and lse into the partial slot. Consumer c writes dims
// [128c, 128c + 128). The Q tile is the exchange buffer: both consumers are past
// their last QK^T here, and the next segment's Q is stored only after the
// barrier at the top of the segment loop. A thread's slot in it is indexed by its
// own thread index, so consumer 0 can overwrite in round 2 what it read in round 1.
template <KvDtype kKv>
__device__ void epilogue(const DecodeParams& p, const PlanBuffers& pb, Smem<kKv>& s, const Segment& seg,
                         const RowState& rs, float (&o)[2][64], int c, int h, int rb) {
  const int t = threadIdx.x % cfg::kWarpgroup, lane = t % 32, q = lane % 4;
  const int G = p.num_q_heads / p.num_kv_heads, rows = p.q_len * G;
  float own_mult[2], inv_sum[2], m_merged[2], l_merged[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float l = rs.l[i];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    inv_sum[i] = l;  // this consumer's row sum until the merge below
    if (q == 0) row_ml(s, c)[(t / 32) * 16 + lane / 4 + 8 * i] = make_float2(rs.m[i], l);
  }
  ptx::named_bar_sync(2, 2 * cfg::kWarpgroup);
  float final_mult = 1.f;
  if (p.scale_mode == ScaleMode::kPerTensor) final_mult = *p.v_scale;
  if (p.scale_mode == ScaleMode::kPerToken) final_mult = 1.f / cfg::kPerTokenVShift;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float2 other = row_ml(s, c ^ 1)[(t / 32) * 16 + lane / 4 + 8 * i];
    const float m = fmaxf(rs.m[i], other.x);
    const float m_use = m == -INFINITY ? 0.f : m;
    own_mult[i] = ptx::ex2_approx(rs.m[i] - m_use);
    const float l = inv_sum[i] * own_mult[i] + other.y * ptx::ex2_approx(other.x - m_use);
    m_merged[i] = m, l_merged[i] = l;
    inv_sum[i] = l > 0.f ? final_mult / l : 0.f;
  }
  float* xbuf = reinterpret_cast<float*>(s.q);  // [64 accumulator elements][128 threads]
  if (c == 1) {  // round 1: consumer 1 hands over its dims [0, 128)
#pragma unroll
    for (int k = 0; k < 64; ++k) xbuf[k * cfg::kWarpgroup + t] = o[0][k] * own_mult[(k % 4) / 2];
  }
  ptx::named_bar_sync(2, 2 * cfg::kWarpgroup);
  if (c == 0) {  // round 2: consumer 0 merges dims [0, 128) and hands over [128, 256)
#pragma unroll
    for (int k = 0; k < 64; ++k) {
      o[0][k] = o[0][k] * own_mult[(k % 4) / 2] + xbuf[k * cfg::kWarpgroup + t];
      xbuf[k * cfg::kWarpgroup + t] = o[1][k] * own_mult[(k % 4) / 2];
    }
  }
  ptx::named_bar_sync(2, 2 * cfg::kWarpgroup);
  if (c == 1) {  // round 3: consumer 1 merges dims [128, 256) into o[0] (free since round 1)
#pragma unroll
    for (int k = 0; k < 64; ++k) o[0][k] = o[1][k] * own_mult[(k % 4) / 2] + xbuf[k * cfg::kWarpgroup + t];
  }
  const float (&mine)[64] = o[0];  // this consumer's merged dims
  const int splits = pb.batch_meta[seg.b * cfg::kBatchMetaInts];
  const int64_t slot = splits > 1 ? pb.batch_meta[seg.b * cfg::kBatchMetaInts + 1] + seg.split : -1;
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

// One tile of this consumer (part-global tile j, j % 2 == c; parity = (j / 2) & 1):
// convert its V; S (per-token K scales applied), release K; softmax and O
// rescale; P fragments, PV. The loader converts K(j + 1) for the other consumer
// during this softmax.
template <KvDtype kKv>
__device__ __forceinline__ void consume_tile(const DecodeParams& p, Smem<kKv>& s, RowState& rs, const Segment& seg,
                                             int c, int tile, uint32_t j, float (&o)[2][64]
                                                 MFA_PROF(, uint32_t (&pc)[prof::kConsSlots], uint32_t& mark)) {
  const uint32_t parity = (j >> 1) & 1;
  convert_own_v(s, c, j, min(cfg::kTileN, seg.seq_len - tile * cfg::kTileN) MFA_PROF(, pc, mark));
  float acc[32];
  ptx::mbar_wait(&s.k_full[c], parity);
  MFA_PROF_LAP(pc, prof::kWaitK, mark);
  mma_qk(s, acc);
  if (p.scale_mode == ScaleMode::kPerToken) scale_k_columns(s, acc);
  __syncwarp();
  if (threadIdx.x % 32 == 0) ptx::mbar_arrive(&s.k_empty);
  MFA_PROF_LAP(pc, prof::kQk, mark);
  float alpha[2];
  softmax_tile(p, s, rs, tile, acc, alpha);
  MFA_PROF_LAP(pc, prof::kSoftmax, mark);
  rescale_o(o, alpha);
  MFA_PROF_LAP(pc, prof::kRescale, mark);
  uint32_t pf[4][4];
  make_p_frags(p, s, c, parity, acc, pf);
  mma_pv(s, c, pf, o);
  MFA_PROF_LAP(pc, prof::kPv, mark);
}

template <KvDtype kKv>
__device__ void consumer_role(const DecodeParams& p, const PlanBuffers& pb, Smem<kKv>& s, const int32_t* meta,
                              int h, int rb MFA_PROF(, unsigned long long* prof_rec)) {
  const int c = threadIdx.x / cfg::kWarpgroup - 1;
  const int t = threadIdx.x % cfg::kWarpgroup;
  const int G = p.num_q_heads / p.num_kv_heads, rows = p.q_len * G;
  Walker w;
  w.init(meta);
  Segment seg, next_seg;
  uint32_t tile_idx = 0;
  MFA_PROF(uint32_t pc[prof::kConsSlots] = {}; uint32_t mark = prof::clk();)
  // Q of segment i + 1 is prefetched into L2 when segment i starts, so that its
  // loads (eight independent 16-byte loads per thread, issued together) hit L2.
  bool have = w.next(p, seg);
  while (have) {
    MFA_PROF(mark = prof::clk(); ++pc[prof::kSegments];)
    QRegs qr;
    if (seg.lo < seg.hi) fetch_q<kKv>(p, seg.b, h, rb, qr);
    ptx::named_bar_sync(2, 2 * cfg::kWarpgroup);  // both done with the previous Q and row_mult
    if (seg.lo < seg.hi) store_q(p, s, rb, qr);
    ptx::fence_proxy_async_smem();
    ptx::named_bar_sync(2, 2 * cfg::kWarpgroup);
    const bool have_next = w.next(p, next_seg);
    if (have_next && next_seg.lo < next_seg.hi) prefetch_q(p, next_seg.b, h, rb);
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
      consume_tile(p, s, rs, seg, c, tile, tile_idx, o MFA_PROF(, pc, mark));
      MFA_PROF(++pc[prof::kTiles];)
    }
    MFA_PROF(mark = prof::clk();)
    epilogue<kKv>(p, pb, s, seg, rs, o, c, h, rb);
    MFA_PROF_LAP(pc, prof::kEpilogue, mark);
    seg = next_seg;
    have = have_next;
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
    decode_sm90_kernel(const __grid_constant__ DecodeParams p, const __grid_constant__ PlanBuffers pb
                           MFA_PROF(, const __grid_constant__ prof::Args pa)) {
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
    for (int st = 0; st < Ring::kKStages; ++st) {
      ptx::mbar_init(&s.raw_k_full[st], 1);
      ptx::mbar_init(&s.raw_k_empty[st], cfg::kWarpgroup);  // the loader's threads
    }
    for (int st = 0; st < Ring::kVStages; ++st) {
      ptx::mbar_init(&s.raw_v_full[st], 1);
      ptx::mbar_init(&s.raw_v_empty[st], cfg::kWarpgroup);  // the threads of the tile's consumer
    }
    ptx::mbar_init(&s.k_empty, 4);  // the 4 warps of the consumer that used the K tile
    for (int c = 0; c < cfg::kNumConsumerWg; ++c) ptx::mbar_init(&s.k_full[c], cfg::kWarpgroup);
    ptx::fence_mbar_init();
  }
  __syncthreads();
  if (threadIdx.x < cfg::kWarpgroup) {
    ptx::setmaxnreg_dec<cfg::kLoaderRegs>();
    loader_role<kKv>(p, s, meta, h MFA_PROF(, prof_rec));
  } else {
    ptx::setmaxnreg_inc<cfg::kConsumerRegs>();
    consumer_role<kKv>(p, pb, s, meta, h, rb MFA_PROF(, prof_rec));
  }
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
  decode_sm90_kernel<kKv><<<grid, cfg::kThreads, kSmem, stream>>>(p, pb MFA_PROF(, prof::Args{prof::buffer()}));
  AFDKIT_CHECK_LAUNCH();
}

}  // namespace afdkit::mfa::sm90
