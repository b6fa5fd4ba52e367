// The sm90a MFA decode kernel: a persistent CTA per (plan part, kv head, 64-row
// block), 3 warpgroups over one shared-memory layout:
//   WG0  loader: bulk copies K/V half-tiles, converts them to swizzled fp16/bf16
//   WG1, WG2  consumers: QK^T and PV on wgmma, online softmax, epilogue
// Pipeline objects: raw_full[stage] (copy -> converter), k_full/v_full (converter
// -> consumers, 128 arrivals), k_empty/v_empty (consumers -> converter, one per
// consumer warp). See docs/mfa-decode.md.
#pragma once
#include "common/cuda_check.h"
#include "common/ptx.cuh"
#include "mfa/launch_checks.h"
#include "mfa/sm90_consumer.cuh"
#include "mfa/sm90_loader.cuh"
#include "mfa/sm90_profile.cuh"
#include "mfa/sm90_smem.cuh"

namespace afdkit::mfa::sm90 {

// Writes the segment's rows of this consumer's 128 dims: bf16 output and lse when
// the sequence is unsplit, else fp32 O/l and lse into the partial slot.
template <KvDtype kKv>
__device__ void epilogue(const DecodeParams& p, const PlanBuffers& pb, const Segment& seg, RowState& rs,
                         const float (&o)[64], int c, int h, int rb) {
  const int t = threadIdx.x % cfg::kWarpgroup, lane = t % 32, q = lane % 4;
  const int G = p.num_q_heads / p.num_kv_heads, rows = p.q_len * G;
  float final_mult = 1.f;
  if (p.scale_mode == ScaleMode::kPerTensor) final_mult = *p.v_scale;
  if (p.scale_mode == ScaleMode::kPerToken) final_mult = 1.f / cfg::kPerTokenVShift;
  const int splits = pb.batch_meta[seg.b * cfg::kBatchMetaInts];
  const int64_t slot = splits > 1 ? pb.batch_meta[seg.b * cfg::kBatchMetaInts + 1] + seg.split : -1;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float l = rs.l[i];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int rg = rb * cfg::kRowsPerCta + (t / 32) * 16 + lane / 4 + 8 * i;
    if (rg >= rows) continue;
    const RowCoord rc = row_coord(rg, G);
    const int hq = h * G + rc.head;
    const float inv = l > 0.f ? final_mult / l : 0.f;
    const float lse = lse_or_neg_inf(rs.m[i], l);
    const int64_t row_idx = (static_cast<int64_t>(seg.b) * p.q_len + rc.token) * p.num_q_heads + hq;
    const int dim0 = c * cfg::kDimsPerConsumer + 2 * q;
    if (slot < 0) {
      auto* out = static_cast<__nv_bfloat16*>(p.out) + seg.b * p.out_stride_b + rc.token * p.out_stride_t +
                  hq * p.out_stride_h + dim0;
#pragma unroll
      for (int n = 0; n < 16; ++n)
        *reinterpret_cast<__nv_bfloat162*>(out + 8 * n) =
            __floats2bfloat162_rn(o[4 * n + 2 * i] * inv, o[4 * n + 2 * i + 1] * inv);
      if (c == 0 && q == 0 && p.lse) p.lse[row_idx] = lse;
    } else {
      const int64_t prow = (slot * p.q_len + rc.token) * p.num_q_heads + hq;
      float* out = pb.o_partial + prow * cfg::kHeadDim + dim0;
#pragma unroll
      for (int n = 0; n < 16; ++n)
        *reinterpret_cast<float2*>(out + 8 * n) = make_float2(o[4 * n + 2 * i] * inv, o[4 * n + 2 * i + 1] * inv);
      if (c == 0 && q == 0) pb.lse_partial[prow] = lse;
    }
  }
}

// One tile: S partial (per-token K scales applied), exchange, release K; softmax;
// P fragments, PV, release V. k_empty is released right after the exchange: the
// K tile and k_scale are read for the last time by then, and the next write of
// xchg (tile + 1) waits for k_full(tile + 1), which the loader can only produce
// after every consumer warp has arrived here, i.e. after both consumers read
// this tile's partials. The loader converts the next K tile during the softmax.
template <KvDtype kKv>
__device__ __forceinline__ void consume_tile(const DecodeParams& p, Smem<kKv>& s, RowState& rs, int c, int tile,
                                             uint32_t parity, float (&o)[64]
                                                 MFA_PROF(, uint32_t (&pc)[prof::kConsSlots], uint32_t& mark)) {
  float acc[32];
  ptx::mbar_wait(&s.k_full, parity);
  MFA_PROF_LAP(pc, prof::kWaitK, mark);
  mma_qk(s, c, acc);
  if (p.scale_mode == ScaleMode::kPerToken) scale_k_columns(s, acc);
  MFA_PROF_LAP(pc, prof::kQk, mark);
  exchange_s(s, c, acc);
  __syncwarp();
  if (threadIdx.x % 32 == 0) ptx::mbar_arrive(&s.k_empty);
  MFA_PROF_LAP(pc, prof::kXchg, mark);
  float alpha[2];
  softmax_tile(p, s, rs, tile, acc, alpha);
#pragma unroll
  for (int n = 0; n < 16; ++n) {
    o[4 * n] *= alpha[0], o[4 * n + 1] *= alpha[0];
    o[4 * n + 2] *= alpha[1], o[4 * n + 3] *= alpha[1];
  }
  MFA_PROF_LAP(pc, prof::kSoftmax, mark);
  ptx::mbar_wait(&s.v_full, parity);
  MFA_PROF_LAP(pc, prof::kWaitV, mark);
  uint32_t pf[4][4];
  make_p_frags(p, s, acc, pf);
  mma_pv(s, c, pf, o);
  __syncwarp();
  if (threadIdx.x % 32 == 0) ptx::mbar_arrive(&s.v_empty);
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
  // Q runs one segment ahead in registers: the loads of segment i + 1 are issued
  // right after segment i's Q is stored and land while its tiles run, so a
  // segment boundary costs a register -> shared-memory convert, not a round trip.
  QRegs qr;
  bool have = w.next(p, seg);
  if (have && seg.lo < seg.hi) fetch_q<kKv>(p, seg.b, h, rb, qr);
  while (have) {
    MFA_PROF(mark = prof::clk(); ++pc[prof::kSegments];)
    ptx::named_bar_sync(2, 2 * cfg::kWarpgroup);  // both done with the previous Q and row_mult
    if (seg.lo < seg.hi) store_q(p, s, rb, qr);
    ptx::fence_proxy_async_smem();
    ptx::named_bar_sync(2, 2 * cfg::kWarpgroup);
    const bool have_next = w.next(p, next_seg);
    if (have_next && next_seg.lo < next_seg.hi) fetch_q<kKv>(p, next_seg.b, h, rb, qr);
    RowState rs;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int r = (t / 32) * 16 + (t % 32) / 4 + 8 * i;
      const int rg = rb * cfg::kRowsPerCta + r;
      rs.m[i] = -INFINITY;
      rs.l[i] = 0.f;
      rs.mult[i] = s.row_mult[r];
      rs.vis[i] = rg < rows ? max(visible_len(seg.seq_len, p.q_len, rg / G), 0) : 0;
    }
    float o[64];
#pragma unroll
    for (int k = 0; k < 64; ++k) o[k] = 0.f;
    MFA_PROF_LAP(pc, prof::kQload, mark);
    for (int tile = seg.lo; tile < seg.hi; ++tile, ++tile_idx)
      consume_tile(p, s, rs, c, tile, tile_idx & 1, o MFA_PROF(, pc, mark));
    MFA_PROF(mark = prof::clk();)
    epilogue<kKv>(p, pb, seg, rs, o, c, h, rb);
    MFA_PROF_LAP(pc, prof::kEpilogue, mark);
    seg = next_seg;
    have = have_next;
  }
#ifdef AFDKIT_MFA_PROFILE
  pc[prof::kTiles] = tile_idx;
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
    for (int st = 0; st < Ring::kStages; ++st) ptx::mbar_init(&s.raw_full[st], 1);
    ptx::mbar_init(&s.k_full, cfg::kWarpgroup);
    ptx::mbar_init(&s.v_full, cfg::kWarpgroup);
    ptx::mbar_init(&s.k_empty, cfg::kNumConsumerWg * 4);
    ptx::mbar_init(&s.v_empty, cfg::kNumConsumerWg * 4);
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
