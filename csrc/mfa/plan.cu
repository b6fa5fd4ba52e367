// Split-KV scheduling on the GPU (plan) and the LSE-weighted merge of partial
// results (combine). The plan reads seq_lens on the device and writes fixed-size
// metadata, so a decode step stays graph-capturable and one plan serves every
// layer of the step.
//
// Cost model: a sequence costs ceil(seq_len / 64) tiles plus kPlanOverheadTiles
// for each part that visits it (what a segment boundary costs the kernel; config.h).
// The parts are filled greedily in sequence order up to a budget (see plan_kernel); a
// part that cannot take one more tile of a sequence closes, so every visit covers >= 1
// tile (or a whole empty sequence, whose zeros/-inf some part must still write).
#include <cuda_bf16.h>

#include <cstdlib>

#include "common/cuda_check.h"
#include "common/ptx.cuh"
#include "mfa/common.cuh"
#include "mfa/launch_checks.h"

namespace afdkit::mfa {
namespace {

struct PartMeta {  // mirrors PlanBuffers::part_meta rows
  int b0, t0, b1, t1;
};

__device__ void write_part(int32_t* meta, int part, const PartMeta& m) {
  int32_t* row = meta + part * cfg::kPartMetaInts;
#pragma unroll
  for (int i = 0; i < cfg::kPartMetaInts; ++i) row[i] = 0;
  row[cfg::kMetaB0] = m.b0;
  row[cfg::kMetaT0] = m.t0;
  row[cfg::kMetaB1] = m.b1;
  row[cfg::kMetaT1] = m.t1;
}

// The greedy fill for a given per-part budget `target` (in tiles, visit overheads
// included). Returns the load of the last part, which takes whatever is left; with
// `write` the part/batch metadata are stored. Every other part holds <= target.
__device__ int64_t fill_parts(const int32_t* seq_lens, int batch, int32_t* part_meta, int32_t* batch_meta,
                              int num_parts, int64_t target, bool write) {
  int part = 0;
  int64_t used = 0;
  bool open = false;
  PartMeta cur{};
  int slot = 0;
  for (int b = 0; b < batch; ++b) {
    const int n = cdiv(max(seq_lens[b], 0), cfg::kTileN);
    int first_part = -1;  // the first part that touches b
    int t = 0;
    do {
      const int64_t need = cfg::kPlanOverheadTiles + (t < n ? 1 : 0);
      if (open && part < num_parts - 1 && used + need > target) {
        if (write) write_part(part_meta, part, cur);
        ++part;
        open = false;
        used = 0;
      }
      if (first_part < 0) first_part = part;
      if (!open) {
        cur = {b, t, b, t};
        open = true;
      }
      used += cfg::kPlanOverheadTiles;
      int take = n - t;
      if (part < num_parts - 1) take = static_cast<int>(min(static_cast<int64_t>(take), max(target - used, static_cast<int64_t>(1))));
      t += take;
      used += take;
      cur.b1 = b;
      cur.t1 = t;
    } while (t < n);
    const int splits = part - first_part + 1;
    if (write) {
      batch_meta[b * cfg::kBatchMetaInts + 0] = splits;
      batch_meta[b * cfg::kBatchMetaInts + 1] = splits > 1 ? slot : -1;
      batch_meta[b * cfg::kBatchMetaInts + 2] = first_part;  // a part's split index = part - this
      batch_meta[b * cfg::kBatchMetaInts + 3] = 0;
    }
    if (splits > 1) slot += splits;
  }
  if (open && write) write_part(part_meta, part, cur);
  return part == num_parts - 1 ? used : 0;
}

// One thread walks the sequences (O(batch + parts) per pass); lanes first sum the costs.
//
// The budget: `cost` counts one visit overhead per sequence, but every cut adds
// another visit (kPlanOverheadTiles more) to the part that continues the sequence.
// With target = ceil(cost / P) alone, the first P - 1 parts fill up with overheads
// of the cut sequences and the LAST part receives the rest: at 1 x 32K, 131 parts
// took 2 tiles each and the last one 250 tiles (the kernel time is that part's time).
// Each closed part holds >= target - overhead and causes at most one extra visit, so
// target = ceil(cost / P) + 2 x overhead always leaves the last part <= cost / P; the
// smallest target in [ceil(cost / P), that] whose last part also fits is used, found by
// bisection (log2(2 x overhead + 1) dry passes; a linear scan took up to 13 at the
// overhead of 6). Where the last part's load is not monotone in the target (a cut can add
// a visit), the bisection may settle above the smallest fitting target; it only accepts
// targets whose last part fits, and the upper end always fits.
__global__ void plan_kernel(const int32_t* seq_lens, int batch, int32_t* part_meta,
                            int32_t* batch_meta, int num_parts) {
  const int lane = threadIdx.x;
  int64_t cost = 0;
  for (int b = lane; b < batch; b += 32)
    cost += cdiv(max(seq_lens[b], 0), cfg::kTileN) + cfg::kPlanOverheadTiles;
#pragma unroll
  for (int off = 16; off > 0; off /= 2) cost += __shfl_xor_sync(0xffffffffu, cost, off);
  for (int part = lane; part < num_parts; part += 32) write_part(part_meta, part, {0, 0, -1, 0});
  __syncwarp();
  if (lane != 0) return;

  const int64_t lo = max(static_cast<int64_t>(cfg::kPlanOverheadTiles + 1), (cost + num_parts - 1) / num_parts);
  const int64_t hi = lo + 2 * cfg::kPlanOverheadTiles;
  int64_t below = lo, target = hi;  // `target` fits; the answer is taken to lie in [below, target]
  while (below < target) {
    const int64_t mid = below + (target - below) / 2;
    if (fill_parts(seq_lens, batch, part_meta, batch_meta, num_parts, mid, false) <= mid) target = mid;
    else below = mid + 1;
  }
  fill_parts(seq_lens, batch, part_meta, batch_meta, num_parts, target, true);
}

// The LSE-weighted merge of the split sequences' partial rows. A row is (sequence b,
// q token i, q head hq); kW warps serve one row and a block of 8 warps serves
// 8 / kW rows. Many splits per sequence (small batches) want many warps per row so
// that several splits' loads are in flight (one warp walking 132 splits in turn was
// bound by one L2 round trip per split: ~35 us at batch 1 x 32K); few splits (large
// batches) want one warp per row, or most of each block idles (a block per row cost
// ~10 us more than a warp per row at batch 64 x 4K). The group's threads take the max
// of the splits' lse; warp w of the group sums splits w, w + kW, ... over all 256
// dims (8 per lane, weight exp(lse_s - max) per split, the unrolled loop keeps
// several splits' loads in flight); the group's warp sums meet in shared memory.
template <int kW>
__global__ void __launch_bounds__(cfg::kCombineWarps * 32)
    combine_kernel(const DecodeParams p, const PlanBuffers pb, int64_t rows) {
  constexpr int kRowsPerBlock = cfg::kCombineWarps / kW;
  __shared__ float warp_max[cfg::kCombineWarps], warp_sum[cfg::kCombineWarps];
  __shared__ float sums[cfg::kCombineWarps][cfg::kHeadDim];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = warp / kW, wi = warp % kW, gt = wi * 32 + lane;  // row group, warp and thread in it
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + g;
  if (row >= rows) return;  // the whole group leaves; groups only sync among themselves
  const int64_t rows_per_b = static_cast<int64_t>(p.q_len) * p.num_q_heads;
  const int b = static_cast<int>(row / rows_per_b);
  const int within = static_cast<int>(row % rows_per_b);  // = i * Hq + hq
  const int splits = pb.batch_meta[b * cfg::kBatchMetaInts];
  if (splits <= 1) return;  // written by the decode kernel
  const int64_t slot0 = pb.batch_meta[b * cfg::kBatchMetaInts + 1];
  const float* lse = pb.lse_partial + slot0 * rows_per_b + within;
  const auto group_sync = [&] {
    if constexpr (kW == 1) __syncwarp();
    else ptx::named_bar_sync(1 + g, kW * 32);
  };
  float mx = -INFINITY;
  for (int s = gt; s < splits; s += kW * 32) mx = fmaxf(mx, lse[s * rows_per_b]);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
  if constexpr (kW > 1) {
    if (lane == 0) warp_max[warp] = mx;
    group_sync();
#pragma unroll
    for (int w = 0; w < kW; ++w) mx = fmaxf(mx, warp_max[g * kW + w]);
  }
  float acc[8] = {}, sum = 0.f;
#pragma unroll 4
  for (int s = wi; s < splits; s += kW) {
    const float w = mx == -INFINITY ? 0.f : expf(lse[s * rows_per_b] - mx);
    const float* o = pb.o_partial + ((slot0 + s) * rows_per_b + within) * cfg::kHeadDim + lane * 8;
    const float4 a = *reinterpret_cast<const float4*>(o);
    const float4 c = *reinterpret_cast<const float4*>(o + 4);
    sum += w;
    acc[0] += w * a.x, acc[1] += w * a.y, acc[2] += w * a.z, acc[3] += w * a.w;
    acc[4] += w * c.x, acc[5] += w * c.y, acc[6] += w * c.z, acc[7] += w * c.w;
  }
  const int i = within / p.num_q_heads, hq = within % p.num_q_heads;
  auto* out = static_cast<__nv_bfloat16*>(p.out) + b * p.out_stride_b + i * p.out_stride_t + hq * p.out_stride_h;
  if constexpr (kW == 1) {
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
#pragma unroll
    for (int e = 0; e < 8; e += 2)
      *reinterpret_cast<__nv_bfloat162*>(out + lane * 8 + e) = __floats2bfloat162_rn(acc[e] * inv, acc[e + 1] * inv);
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) sums[warp][lane * 8 + e] = acc[e];
    if (lane == 0) warp_sum[warp] = sum;  // every lane of a warp holds the same sum
    group_sync();
    sum = 0.f;
#pragma unroll
    for (int w = 0; w < kW; ++w) sum += warp_sum[g * kW + w];
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    for (int d = gt; d < cfg::kHeadDim; d += kW * 32) {
      float v = 0.f;
#pragma unroll
      for (int w = 0; w < kW; ++w) v += sums[g * kW + w][d];
      out[d] = __float2bfloat16_rn(v * inv);
    }
  }
  if (gt == 0 && p.lse) p.lse[static_cast<int64_t>(b) * rows_per_b + within] = sum > 0.f ? mx + logf(sum) : -INFINITY;
}

}  // namespace

PlanSizes plan_sizes(int batch, int q_len, int num_q_heads, int num_kv_heads, int num_sms) {
  AFDKIT_CHECK(batch >= 0 && q_len >= 1 && q_len <= cfg::kMaxQLen && num_kv_heads >= 1 &&
                   num_q_heads % num_kv_heads == 0 && num_sms >= 1,
               "mfa.plan_sizes: bad shape (batch ", batch, ", q_len ", q_len, ", heads ", num_q_heads,
               "/", num_kv_heads, ", sms ", num_sms, ")");
  const int rows = q_len * (num_q_heads / num_kv_heads);
  const int ctas_per_part = num_kv_heads * cdiv(rows, cfg::kRowsPerCta);
  PlanSizes s;
  s.num_sm_parts = num_sms / ctas_per_part > 1 ? num_sms / ctas_per_part : 1;
  s.part_meta_ints = static_cast<int64_t>(s.num_sm_parts) * cfg::kPartMetaInts;
  s.batch_meta_ints = static_cast<int64_t>(batch) * cfg::kBatchMetaInts;
  // Each of the num_sm_parts - 1 part boundaries cuts at most one sequence, adding
  // one split to it and making it split at most once: slots <= min(batch, P-1) + P-1.
  const int64_t cuts = s.num_sm_parts - 1;
  s.num_slots = (batch < cuts ? batch : cuts) + cuts;
  s.lse_partial_floats = s.num_slots * q_len * num_q_heads;
  s.o_partial_floats = s.lse_partial_floats * cfg::kHeadDim;
  return s;
}

void plan(const int32_t* seq_lens, int batch, const PlanBuffers& pb, cudaStream_t stream) {
  AFDKIT_CHECK(batch >= 0 && pb.num_sm_parts >= 1, "mfa.plan: batch must be >= 0 and num_sm_parts >= 1");
  AFDKIT_CHECK(pb.part_meta && (batch == 0 || (seq_lens && pb.batch_meta)),
               "mfa.plan: null seq_lens/part_meta/batch_meta");
  detail::check_plan_meta_aligned(pb, "mfa.plan");
  plan_kernel<<<1, cfg::kPlanThreads, 0, stream>>>(seq_lens, batch, pb.part_meta, pb.batch_meta,
                                                   pb.num_sm_parts);
  AFDKIT_CHECK_LAUNCH();
}

namespace detail {
// Warps per output row: about one per 8 splits a sequence has on average (parts per
// sequence when the work spreads evenly), 1..8. AFDKIT_MFA_COMBINE_WARPS overrides it
// (1, 2, 4 or 8) for A/B timing.
int combine_warps_per_row(int batch, int num_sm_parts) {
  static const int forced = [] {  // read once, not on every decode call
    const char* v = std::getenv("AFDKIT_MFA_COMBINE_WARPS");
    const int w = v ? std::atoi(v) : 0;
    return w == 1 || w == 2 || w == 4 || w == 8 ? w : 0;
  }();
  if (forced) return forced;
  const int splits = (num_sm_parts + batch - 1) / batch;
  return splits >= 32 ? 8 : splits >= 12 ? 4 : splits >= 4 ? 2 : 1;
}

void launch_combine(const DecodeParams& p, const PlanBuffers& pb, cudaStream_t stream) {
  if (pb.num_sm_parts <= 1 || p.batch == 0) return;  // nothing can be split
  const int64_t rows = static_cast<int64_t>(p.batch) * p.q_len * p.num_q_heads;
  const int w = combine_warps_per_row(p.batch, pb.num_sm_parts);
  const int64_t blocks = (rows * w + cfg::kCombineWarps - 1) / cfg::kCombineWarps;
  AFDKIT_CHECK(blocks < (int64_t{1} << 31), "mfa.combine: too many rows (", rows, ")");
  // A plain launch: as a programmatic dependent of the decode kernel (launched
  // early, waiting in griddepcontrol.wait) the whole decode + combine call was 5-7 us
  // slower at batch 1 and no faster at batch 8-128 (H100, bench/results/2026-12-07-h100-mfa-v6.md).
  const dim3 grid(static_cast<unsigned>(blocks)), block(cfg::kCombineWarps * 32);
  switch (w) {
    case 1: combine_kernel<1><<<grid, block, 0, stream>>>(p, pb, rows); break;
    case 2: combine_kernel<2><<<grid, block, 0, stream>>>(p, pb, rows); break;
    case 4: combine_kernel<4><<<grid, block, 0, stream>>>(p, pb, rows); break;
    default: combine_kernel<8><<<grid, block, 0, stream>>>(p, pb, rows); break;
  }
  AFDKIT_CHECK_LAUNCH();
}
}  // namespace detail

}  // namespace afdkit::mfa
