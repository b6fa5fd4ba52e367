// Warpgroups 1 and 2 of the sm90 decode kernel. Both serve the same 64 rows and
// split the tiles: consumer c takes tiles j % 2 == c of its part, over all 256
// dims (S = Q K^T with wgmma m64n64k16 from shared memory, online softmax, O +=
// P V with two wgmma m64n128k16, P from registers, V N-major). Each keeps its own
// running max, sum and O (64 x 256 fp32); the two are merged per segment in the
// epilogue. While one consumer runs its softmax the other can use the tensor
// cores, so the per-tile chain no longer serialises the CTA.
//
// Register layouts (wgmma accumulator, thread t of the warpgroup, w = t / 32,
// lane l, g = l / 4, q = l % 4): element k of an m64nN accumulator sits at row
// 16w + g + 8 * ((k % 4) / 2), column 8 * (k / 4) + 2q + (k % 2).
#pragma once
#include "common/ptx.cuh"
#include "mfa/sm90_smem.cuh"

namespace afdkit::mfa::sm90 {

// fp8: bytes of one e4m3 Q term (64 rows x 256 dims); the low term follows the high one.
constexpr int kQTermBytes = cfg::kRowsPerCta * cfg::kHeadDim;

struct RowState {
  float m[2];     // running max of the log2-domain logits (rows g and g + 8)
  float l[2];     // this thread's partial row sums (quad-reduced at the end)
  int vis[2];     // visible tokens of the row (0 for padding rows)
};

// Q of a segment is loaded in two steps so that its global-memory latency is
// hidden: fetch_q issues the eight 16-byte loads of this thread (warp w takes
// rows w, w + 8, ..., lane l dims [8l, 8l + 8): each load is one coalesced
// 512-byte row per warp) into registers, one segment ahead, and store_q later
// converts them. Rows past the CTA's valid rows are zero.
struct QRegs {
  uint4 v[cfg::kRowsPerCta / 8];
};

// Address of the 16-byte piece of Q row i (0..7) that thread `ct` of the consumers
// loads; rows past the CTA's valid rows (valid = false) point at the last valid row, so
// the address is always readable and the loads need no branch: branches between the
// eight loads split the code into blocks, and ptxas then waited for the segment's
// scalar loads before issuing the Q loads (two round trips instead of one).
struct QPiece {
  const uint4* src;
  bool valid;
};
__device__ __forceinline__ QPiece q_piece(const DecodeParams& p, int G, int b, int h, int rb, int ct, int i) {
  const int warp = ct / 32, lane = ct % 32;
  const int rows = p.q_len * G;
  const int rg = rb * cfg::kRowsPerCta + warp + 8 * i;
  const RowCoord rc = row_coord(min(rg, rows - 1), G);
  const auto* src = static_cast<const __nv_bfloat16*>(p.q) + b * p.q_stride_b + rc.token * p.q_stride_t +
                    (h * G + rc.head) * p.q_stride_h + lane * 8;
  return {reinterpret_cast<const uint4*>(src), rg < rows};
}

// One segment ahead, the consumers only prefetch Q into L2 (each 16-byte piece's
// line; 4 threads share one): holding the loads in registers through the tile loop
// would cost 32 registers that the consumers, at their cap with O, do not have.
__device__ __forceinline__ void prefetch_q(const DecodeParams& p, int G, int b, int h, int rb) {
  const int ct = threadIdx.x - cfg::kWarpgroup;
  if (ct % 8 != 0) return;  // one thread per 128-byte line
#pragma unroll
  for (int i = 0; i < cfg::kRowsPerCta / 8; ++i) {
    const QPiece q = q_piece(p, G, b, h, rb, ct, i);
    if (q.valid) ptx::prefetch_l2(q.src);
  }
}

// Unconditional loads (padding rows read the last valid row) and a select.
template <KvDtype kKv>
__device__ __forceinline__ void fetch_q(const DecodeParams& p, int G, int b, int h, int rb, QRegs& qr) {
  const int ct = threadIdx.x - cfg::kWarpgroup;  // 0..255
#pragma unroll
  for (int i = 0; i < cfg::kRowsPerCta / 8; ++i) {
    const QPiece q = q_piece(p, G, b, h, rb, ct, i);
    const uint4 v = __ldg(q.src);
    qr.v[i] = q.valid ? v : make_uint4(0, 0, 0, 0);
  }
}

// Q rows -> operand tile, scaled per row by a power of two qf that puts the row's
// |max| in [128, 256) (fp16 range and precision for any input); row_mult = 1 / qf
// times softmax_scale * log2(e) (* k_scale per tensor). This conversion is the critical
// path of a CTA's start (all Q pieces in registers -> Q in shared memory), so it is
// written for few instructions: the scale comes from the bf16 exponent bits of the
// row's |max| (no frexp, no division), two rows share each shuffle (bf16x2), the
// scaling is one exact bf16x2 multiply, and the fp8 terms are split in f16x2.
struct QRowScale {
  float qf;   // 2^k
  float inv;  // 2^-k
};
// `amax` = the row's |max| as bf16 bits (low 16 bits). amax in [2^(e-127), 2^(e-126))
// for biased exponent e, so qf = 2^(134 - e); zero and subnormal rows (e = 0) and
// inf/NaN (e = 255) keep qf = 1, and |max| < 2^-119 (e < 8) is clamped to 2^126.
__device__ __forceinline__ QRowScale q_row_scale(uint32_t amax) {
  const int e = static_cast<int>((amax >> 7) & 0xffu);
  const int k = (e == 0 || e == 255) ? 0 : min(134 - e, 126);
  return {__int_as_float((127 + k) << 23), __int_as_float((127 - k) << 23)};
}

__device__ __forceinline__ __nv_bfloat162 as_bf162(uint32_t w) { return *reinterpret_cast<__nv_bfloat162*>(&w); }
__device__ __forceinline__ uint32_t as_u32(__nv_bfloat162 v) { return *reinterpret_cast<uint32_t*>(&v); }

// |max| over one 16-byte piece (8 bf16), as a bf16x2 of two candidates.
__device__ __forceinline__ __nv_bfloat162 piece_absmax(const uint4& v) {
  return __hmax2(__hmax2(__habs2(as_bf162(v.x)), __habs2(as_bf162(v.y))),
                 __hmax2(__habs2(as_bf162(v.z)), __habs2(as_bf162(v.w))));
}

// Row |max| of rows a (low half) and b (high half) over the warp's 32 lanes.
__device__ __forceinline__ uint32_t row_pair_absmax(const uint4& a, const uint4& b) {
  const uint32_t ma = as_u32(piece_absmax(a)), mb = as_u32(piece_absmax(b));
  __nv_bfloat162 m = __hmax2(as_bf162(__byte_perm(ma, mb, 0x5410)), as_bf162(__byte_perm(ma, mb, 0x7632)));
#pragma unroll
  for (int off = 16; off > 0; off /= 2) m = __hmax2(m, as_bf162(__shfl_xor_sync(0xffffffffu, as_u32(m), off)));
  return as_u32(m);
}

// One word of Q (2 bf16) times qf (exact: a power of two, |result| < 256) -> e4m3 codes
// of hi = e4m3(x) and lo = e4m3(x - hi) (x in f16: exact for the bf16 mantissa, and the
// difference of two nearby f16 is exact).
__device__ __forceinline__ void q_word_e4m3_terms(uint32_t w, __nv_bfloat162 qf2, uint16_t& hi, uint16_t& lo) {
  const uint32_t x = as_u32(__hmul2(as_bf162(w), qf2));
  const __half2 h = __floats2half2_rn(__uint_as_float(x << 16), __uint_as_float(x & 0xffff0000u));
  hi = ptx::cvt_f16x2_e4m3x2(*reinterpret_cast<const uint32_t*>(&h));
  const uint32_t back = ptx::cvt_e4m3x2_f16x2(hi);
  const __half2 d = __hsub2(h, *reinterpret_cast<const __half2*>(&back));
  lo = ptx::cvt_f16x2_e4m3x2(*reinterpret_cast<const uint32_t*>(&d));
}

// Row r's piece of this lane (dims [8 lane, +8)) -> the operand tile. fp8: two e4m3
// terms (hi, lo: (hi + lo) . K keeps ~7 mantissa bits of Q; one term alone would cost
// ~3 % in the logits), each a 64 x 256 e4m3 tile (16 KB: two 128-byte-swizzled column
// blocks), this lane writing 8 bytes, half of 16-byte chunk lane / 2. bf16: one tile.
template <KvDtype kKv>
__device__ __forceinline__ void store_q_row(Smem<kKv>& s, int r, int lane, const uint4& v, QRowScale sc) {
  const __nv_bfloat162 qf2 = __float2bfloat162_rn(sc.qf);
  if constexpr (Traits<kKv>::kFp8) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
    uint16_t hi[4], lo[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) q_word_e4m3_terms(w[j], qf2, hi[j], lo[j]);
    const uint32_t off = op_chunk_offset(r, lane >> 1) + (lane & 1) * 8;
    *reinterpret_cast<uint2*>(s.q + off) = make_uint2(hi[0] | (static_cast<uint32_t>(hi[1]) << 16),
                                                      hi[2] | (static_cast<uint32_t>(hi[3]) << 16));
    *reinterpret_cast<uint2*>(s.q + kQTermBytes + off) = make_uint2(lo[0] | (static_cast<uint32_t>(lo[1]) << 16),
                                                                    lo[2] | (static_cast<uint32_t>(lo[3]) << 16));
  } else {
    static_assert(std::is_same_v<typename Traits<kKv>::Op, __nv_bfloat16>, "bf16 caches use a bf16 operand");
    const uint4 x = make_uint4(as_u32(__hmul2(as_bf162(v.x), qf2)), as_u32(__hmul2(as_bf162(v.y), qf2)),
                               as_u32(__hmul2(as_bf162(v.z), qf2)), as_u32(__hmul2(as_bf162(v.w), qf2)));
    *reinterpret_cast<uint4*>(s.q + op_chunk_offset(r, lane)) = x;
  }
}

template <KvDtype kKv>
__device__ __forceinline__ void store_q(const DecodeParams& p, Smem<kKv>& s, int rb, const QRegs& qr,
                                        float base_mult) {
  constexpr int kR = cfg::kRowsPerCta / 8;
  static_assert(kR % 2 == 0, "rows are converted in pairs");
  const int ct = threadIdx.x - cfg::kWarpgroup;  // 0..255
  const int warp = ct / 32, lane = ct % 32;
  const int rows = p.q_len * (p.num_q_heads / p.num_kv_heads);
#pragma unroll
  for (int i = 0; i < kR; i += 2) {
    const uint32_t m = row_pair_absmax(qr.v[i], qr.v[i + 1]);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = warp + 8 * (i + h);
      const QRowScale sc = q_row_scale(m >> (16 * h));
      store_q_row(s, r, lane, qr.v[i + h], sc);
      if (lane == 0) s.row_mult[r] = rb * cfg::kRowsPerCta + r < rows ? base_mult * sc.inv : 0.f;
    }
  }
}

// fp8 K-step `st` of QK^T (Q term st / 8: high, low; dims 32 (st % 8)..+32): byte
// offsets of its A tile in s.q and of its B tile in the K stage (a 32-byte slice of a
// 128-byte swizzle row, in column block (st % 8) / 4).
__device__ __forceinline__ uint32_t k_step_offset(int ks) {  // 32-byte K-step ks of a 256-dim row
  return (ks / 4) * cfg::kColBlockBytes + (ks % 4) * 32;
}
__device__ __forceinline__ uint32_t qk_e4m3_k_offset(int st) { return k_step_offset(st % (cfg::kHeadDim / 32)); }
__device__ __forceinline__ uint32_t qk_e4m3_q_offset(int st) {
  return (st / (cfg::kHeadDim / 32)) * kQTermBytes + qk_e4m3_k_offset(st);
}

// S = Q . K^T over all 256 dims, K read in place from its raw stage (TMA wrote it
// in the 128B-swizzled K-major layout). fp8: 2 x 8 e4m3 K-steps of 32 dims (the high
// and the low Q term); bf16: 16 K-steps of 16 dims. A K-step of either is 32 bytes of
// a 128-byte swizzle row.
template <KvDtype kKv>
__device__ __forceinline__ void mma_qk(Smem<kKv>& s, int stage, float (&acc)[32]) {
  using Op = typename Traits<kKv>::Op;
  const uint32_t q_base = ptx::smem_addr(s.q), k_base = ptx::smem_addr(s.raw_k[stage]);
  ptx::wgmma_fence();
  if constexpr (Traits<kKv>::kFp8) {
    constexpr int kSteps = 2 * cfg::kHeadDim / 32;  // (term, 32-dim K-step) pairs
    constexpr int kGroup = cfg::kQkPromoteSteps;
    static_assert(kSteps % kGroup == 0, "promotion groups tile the K-steps");
    if constexpr (kGroup == kSteps) {  // one accumulator (the first GPU run: too coarse)
#pragma unroll
      for (int st = 0; st < kSteps; ++st)
        ptx::wgmma_m64n64k32_ss_e4m3(acc, ptx::make_smem_desc(q_base + qk_e4m3_q_offset(st), 16, 1024),
                                     ptx::make_smem_desc(k_base + qk_e4m3_k_offset(st), 16, 1024), st > 0);
    } else {
      // Hopper's fp8 wgmma keeps 13-14 bits in its accumulation (see docs/mfa-decode.md,
      // Numerics): the high Q term's K-steps get a fresh accumulator every kGroup steps,
      // added in fp32 on the CUDA cores. The low term is ~2^-4 of the high one, so its
      // truncation error is too: it is chained (8 steps) straight into the S accumulator,
      // whose chain runs while the first high group is waited for. Every wgmma covers all
      // 64 tokens (n64, a 32-register fresh accumulator): 8 / kGroup waits per tile. The
      // same promotion over two 32-token halves (16 registers, twice the waits) was
      // 5-11 % slower at batch 8-128 (H100; bench/results/2026-12-07-h100-mfa-v6-switches.md).
      constexpr int kHalfSteps = kSteps / 2;  // K-steps of one Q term
      constexpr int kHiGroups = kHalfSteps / kGroup;
      static_assert(kHalfSteps % kGroup == 0, "promotion groups tile the high term's K-steps");
#pragma unroll
      for (int st = kHalfSteps; st < kSteps; ++st)
        ptx::wgmma_m64n64k32_ss_e4m3(acc, ptx::make_smem_desc(q_base + qk_e4m3_q_offset(st), 16, 1024),
                                     ptx::make_smem_desc(k_base + qk_e4m3_k_offset(st), 16, 1024), st > kHalfSteps);
      float part[32];
#pragma unroll
      for (int g = 0; g < kHiGroups; ++g) {
        if (g > 0) ptx::wgmma_fence();
#pragma unroll
        for (int st = g * kGroup; st < (g + 1) * kGroup; ++st)
          ptx::wgmma_m64n64k32_ss_e4m3(part, ptx::make_smem_desc(q_base + qk_e4m3_q_offset(st), 16, 1024),
                                       ptx::make_smem_desc(k_base + qk_e4m3_k_offset(st), 16, 1024), st > g * kGroup);
        ptx::wgmma_commit();
        ptx::wgmma_wait<0>();
        if (g == 0) ptx::fence_regs(acc);
        ptx::fence_regs(part);
#pragma unroll
        for (int k = 0; k < 32; ++k) acc[k] += part[k];
      }
      return;
    }
  } else {
#pragma unroll
    for (int ks = 0; ks < cfg::kHeadDim / 16; ++ks) {
      const uint32_t off = k_step_offset(ks);
      ptx::wgmma_m64n64k16_ss<Op>(acc, ptx::make_smem_desc(q_base + off, 16, 1024),
                                  ptx::make_smem_desc(k_base + off, 16, 1024), ks > 0);
    }
  }
  ptx::wgmma_commit();
  ptx::wgmma_wait<0>();
  ptx::fence_regs(acc);
}

// O += P . V over 256 dims as two m64n128 column halves (o[0]: dims 0..127,
// o[1]: 128..255), 4 K-steps of 16 tokens each, V N-major from v_op[c].
template <KvDtype kKv>
__device__ __forceinline__ void mma_pv(Smem<kKv>& s, int c, const uint32_t (&pf)[4][4], float (&o)[2][64]) {
  using Op = typename Traits<kKv>::Op;
  const uint32_t v_base = ptx::smem_addr(s.v_op[c]);
  ptx::wgmma_fence();
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int dim_half = half ^ c;  // o[0] = the dims this consumer finishes: [128c, 128c + 128)
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
      ptx::wgmma_m64n128k16_rs_tnspb<Op>(
          o[half], pf[kk],
          ptx::make_smem_desc(v_base + 2 * dim_half * cfg::kColBlockBytes + kk * 16 * cfg::kSwizzleBytes,
                              cfg::kColBlockBytes, 1024));
  }
  ptx::wgmma_commit();
  ptx::wgmma_wait<0>();
  ptx::fence_regs(o[0]);
  ptx::fence_regs(o[1]);
}

// Per-token K scales multiply the S columns right after QK^T, so that k_scale and
// the K tile are free as soon as the consumer releases them.
template <KvDtype kKv>
__device__ __forceinline__ void scale_k_columns(const Smem<kKv>& s, int stage, float (&acc)[32]) {
  const int q = threadIdx.x % 4;
#pragma unroll
  for (int n = 0; n < 8; ++n) {
    const float2 ks = *reinterpret_cast<const float2*>(&s.k_scale[stage][8 * n + 2 * q]);
    acc[4 * n] *= ks.x, acc[4 * n + 1] *= ks.y;
    acc[4 * n + 2] *= ks.x, acc[4 * n + 3] *= ks.y;
  }
}

// Online softmax over one tile: S (accumulator units, K scales applied) -> P in
// place (fp32), the per-row rescale factor of O in alpha.
template <KvDtype kKv>
__device__ __forceinline__ void softmax_tile(const DecodeParams& p, Smem<kKv>& s, RowState& rs, int tile,
                                             float (&acc)[32], float (&alpha)[2]) {
  const int lane = threadIdx.x % 32, q = lane % 4;
  const int tok0 = tile * cfg::kTileN + 2 * q;
  const int row0 = (threadIdx.x % cfg::kWarpgroup / 32) * 16 + lane / 4;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    // Read per tile rather than held in registers (consumers run at the register
    // cap); row_mult is rewritten only after both consumers finished the segment.
    const float mult = s.row_mult[row0 + 8 * i];
    float mx = -INFINITY;
#pragma unroll
    for (int n = 0; n < 8; ++n) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        float x = acc[4 * n + 2 * i + j] * mult;
        x = tok0 + 8 * n + j < rs.vis[i] ? x : -INFINITY;
        acc[4 * n + 2 * i + j] = x;
        mx = fmaxf(mx, x);
      }
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_new = fmaxf(rs.m[i], mx);
    const float m_use = m_new == -INFINITY ? 0.f : m_new;  // nothing visible yet: keep zeros
    alpha[i] = ptx::ex2_approx(rs.m[i] - m_use);
    float sum = 0.f;
#pragma unroll
    for (int n = 0; n < 8; ++n) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const float e = ptx::ex2_approx(acc[4 * n + 2 * i + j] - m_use);
        acc[4 * n + 2 * i + j] = e;
        sum += e;
      }
    }
    rs.l[i] = rs.l[i] * alpha[i] + sum;
    rs.m[i] = m_new;
  }
}

// P (fp32 accumulator layout) -> wgmma A fragments: K-step kk takes accumulator
// chunks 2kk and 2kk+1, which are exactly the A-fragment rows/columns of a thread.
// Per-token V scales multiply the columns (x 2^10, undone in the epilogue).
template <KvDtype kKv>
__device__ __forceinline__ void make_p_frags(const DecodeParams& p, const Smem<kKv>& s, int slot,
                                             const float (&acc)[32], uint32_t (&pf)[4][4]) {
  using Op = typename Traits<kKv>::Op;
  const int q = threadIdx.x % 4;
  const bool per_token = per_token_scales<kKv>(p);
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int k = 8 * kk + 2 * r;  // accumulator index of the pair
      float a = acc[k], b = acc[k + 1];
      if (per_token) {
        const int col = 16 * kk + 8 * (r / 2) + 2 * q;
        a *= s.v_scale[slot][col] * cfg::kPerTokenVShift;
        b *= s.v_scale[slot][col + 1] * cfg::kPerTokenVShift;
      }
      pf[kk][r] = ptx::pack2<Op>(a, b);
    }
  }
}

// O *= alpha per row. After the first tiles a row's max rarely moves (alpha == 1
// exactly), so a warp skips the 128 multiplies when none of its rows changed.
__device__ __forceinline__ void rescale_o(float (&o)[2][64], const float (&alpha)[2]) {
  if (!__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) return;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
#pragma unroll
    for (int n = 0; n < 16; ++n) {
      o[half][4 * n] *= alpha[0], o[half][4 * n + 1] *= alpha[0];
      o[half][4 * n + 2] *= alpha[1], o[half][4 * n + 3] *= alpha[1];
    }
  }
}

}  // namespace afdkit::mfa::sm90
