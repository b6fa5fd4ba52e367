// The dispatch half of the CUDA IPC dispatcher (see dispatch_ipc.h): dispatch_send
// stores every token once per destination rank into that rank's receive area through
// NVLink, dispatch_recv lays the received rows out expert-major.
#include <cuda_bf16.h>

#include <algorithm>

#include "common/cuda_check.h"
#include "moe/dispatch_ipc.cuh"
#include "quant/fp8.cuh"

namespace afdkit::moe::ipc {
namespace {

using dev::arrive_last;
using dev::report;

constexpr int kWarp = 32;
constexpr int kSendThreads = 256;
constexpr int kSendChunk = 4096;  // channels of a token per dispatch_send block (32 groups of 128 in one pass)
constexpr int kRecvThreads = 512;
constexpr int kRecvWarps = kRecvThreads / kWarp;

// ---- dispatch_send ------------------------------------------------------------------------

struct SendShared {
  uint8_t* rows[kMaxRanks];  // this token's row in every destination's receive area
  int ids[kMaxTopK];
  float weights[kMaxTopK];
  int ndest;
  bool last;
};

__device__ __forceinline__ int load_id(const DispatchSendArgs& a, int64_t i) {
  if (!a.ids64) return static_cast<const int32_t*>(a.ids)[i];
  const int64_t v = static_cast<const int64_t*>(a.ids)[i];
  return v < 0 || v > 0x7FFFFFFF ? -1 : static_cast<int>(v);
}

// Thread 0: the token's top-k meta and the destinations (ranks owning one of its experts).
__device__ void plan_token(const Common& c, const DispatchSendArgs& a, int t, SendShared& s) {
  const Config& cfg = c.cfg;
  uint32_t mask = 0;
  for (int j = 0; j < cfg.top_k; ++j) {
    int id = load_id(a, static_cast<int64_t>(t) * cfg.top_k + j);
    if (id < 0 || id >= cfg.num_experts) {
      if (blockIdx.y == 0) report(c.error, ErrorKind::kBadExpert, c.slot, cfg.rank, static_cast<uint32_t>(id));
      id = -1;  // never local anywhere: the token skips this slot
    } else {
      mask |= 1u << (id / cfg.local_experts);
    }
    s.ids[j] = id;
    s.weights[j] = a.weights[static_cast<int64_t>(t) * cfg.top_k + j];
  }
  if (blockIdx.y == 0) c.buf.dest_mask[t] = mask;
  int n = 0;
  for (uint32_t m = mask; m != 0; m &= m - 1) {
    const int r = __ffs(m) - 1;
    s.rows[n++] = dev::recv_row(cfg, dev::slot_base(c, r), cfg.rank, t);
  }
  s.ndest = n;
}

// Quantizes channels [begin, end) of the token (8 threads per 128-channel group, 16
// channels each) exactly as afdkit.reference.quantize_fp8 "channel128" does, and stores
// codes and scales into every destination row with 16-byte (codes) stores.
__device__ void send_fp8(const Common& c, const __nv_bfloat16* xrow, const SendShared& s, int begin, int end) {
  const int lane8 = threadIdx.x & 7;
  const unsigned gmask = 0xFFu << (threadIdx.x & 24);
  const int g = (begin + static_cast<int>(threadIdx.x >> 3) * kQuantGroup) / kQuantGroup;
  if (g * kQuantGroup >= end) return;  // whole 8-lane groups leave together
  const int c0 = g * kQuantGroup + lane8 * 16;
  const uint4* src = reinterpret_cast<const uint4*>(xrow + c0);
  float lo[8], hi[8];
  dev::unpack8(src[0], lo);
  dev::unpack8(src[1], hi);
  float amax = 0.f;
  bool nan = false;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    nan |= isnan(lo[i]) || isnan(hi[i]);
    amax = fmaxf(amax, fmaxf(fabsf(lo[i]), fabsf(hi[i])));
  }
#pragma unroll
  for (int off = 4; off > 0; off /= 2) amax = fmaxf(amax, __shfl_xor_sync(gmask, amax, off));
  if (__any_sync(gmask, nan)) amax = __int_as_float(0x7fc00000);  // torch's amax propagates NaN
  const float scale = quant::scale_from_amax(amax);
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float* v = i < 2 ? lo + 4 * i : hi + 4 * (i - 2);
    w[i] = 0;
#pragma unroll
    for (int b = 0; b < 4; ++b) w[i] |= static_cast<uint32_t>(quant::encode_e4m3(v[b], scale)) << (8 * b);
  }
  const uint4 codes = make_uint4(w[0], w[1], w[2], w[3]);
  const int64_t scale_at = c.cfg.layout.scale_offset + static_cast<int64_t>(g) * 4;
  for (int d = 0; d < s.ndest; ++d) {
    *reinterpret_cast<uint4*>(s.rows[d] + c0) = codes;
    if (lane8 == 0) *reinterpret_cast<float*>(s.rows[d] + scale_at) = scale;
  }
}

// Copies bf16 channels [begin, end) into every destination row (16-byte stores when vec).
__device__ void send_bf16(const __nv_bfloat16* xrow, const SendShared& s, int begin, int end, bool vec) {
  if (vec) {
    for (int i = begin / 8 + threadIdx.x; i < end / 8; i += blockDim.x) {
      const uint4 v = reinterpret_cast<const uint4*>(xrow)[i];
      for (int d = 0; d < s.ndest; ++d) reinterpret_cast<uint4*>(s.rows[d])[i] = v;
    }
    return;
  }
  const auto* src = reinterpret_cast<const uint16_t*>(xrow);
  for (int i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const uint16_t v = src[i];
    for (int d = 0; d < s.ndest; ++d) reinterpret_cast<uint16_t*>(s.rows[d])[i] = v;
  }
}

// The token's ids and weights go to EVERY rank, also those that own none of its experts:
// a receiver scans the meta of all rows t < T of a source to find its tokens, so no row
// may keep the ids of an earlier call (a few bytes per rank and token; the codes and
// scales go to the destinations only).
__device__ void store_meta(const Common& c, const SendShared& s, int t) {
  const Config& cfg = c.cfg;
  for (int i = threadIdx.x; i < cfg.ranks * cfg.top_k; i += blockDim.x) {
    const int r = i / cfg.top_k, j = i - r * cfg.top_k;
    uint8_t* meta = dev::recv_row(cfg, dev::slot_base(c, r), cfg.rank, t) + cfg.layout.meta_offset;
    reinterpret_cast<int32_t*>(meta)[j] = s.ids[j];
    reinterpret_cast<float*>(meta)[cfg.top_k + j] = s.weights[j];
  }
}

// Last block: clear this rank's combine flags of the slot's previous call (every rank's
// combine_recv of that call is done: each got here only after a peer saw our flag...
// see docs/moe.md), then announce T + 1 to every rank, own included.
__device__ void signal_dispatch(const Common& c, int tokens) {
  const Config& cfg = c.cfg;
  uint64_t* cflags = dev::combine_flags(cfg.layout, dev::local_slot(c));
  for (int r = 0; r < cfg.ranks; ++r) dev::st_relaxed_sys(cflags + r, 0);
  dev::fence_acq_rel_sys();
  for (int i = 1; i <= cfg.ranks; ++i) {
    const int r = (cfg.rank + i) % cfg.ranks;  // peers first, each rank starting elsewhere
    dev::st_release_sys(dev::dispatch_flags(cfg.layout, dev::slot_base(c, r)) + cfg.rank,
                        static_cast<uint64_t>(tokens) + 1);
  }
}

// Grid (max(T, 1), chunks of kSendChunk channels). Every block takes part in the
// last-block count, also when T = 0: each rank gets a flag every call.
__global__ void __launch_bounds__(kSendThreads) dispatch_send_kernel(Common c, DispatchSendArgs a, bool vec) {
  __shared__ SendShared s;
  const Config& cfg = c.cfg;
  const int t = blockIdx.x;
  if (t < a.tokens) {
    if (threadIdx.x == 0) plan_token(c, a, t, s);
    __syncthreads();
    if (blockIdx.y == 0) store_meta(c, s, t);
    const auto* xrow = static_cast<const __nv_bfloat16*>(a.x) + static_cast<int64_t>(t) * cfg.hidden;
    const int begin = blockIdx.y * kSendChunk;
    const int end = min(cfg.hidden, begin + kSendChunk);
    if (cfg.fp8) {
      send_fp8(c, xrow, s, begin, end);
    } else {
      send_bf16(xrow, s, begin, end, vec);
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) s.last = arrive_last(&c.buf.counters[0], gridDim.x * gridDim.y);
  __syncthreads();
  if (s.last && threadIdx.x == 0) signal_dispatch(c, a.tokens);
}

// ---- dispatch_recv ------------------------------------------------------------------------

struct RecvShared {
  int tokens[kMaxRanks];
  int fail;
};

// Waits for every source's dispatch flag (bounded); false (error reported) on a timeout
// or an impossible token count. Uniform over the block.
__device__ bool wait_sources(const Common& c, RecvShared& s) {
  const Config& cfg = c.cfg;
  if (threadIdx.x == 0) s.fail = 0;
  __syncthreads();
  if (threadIdx.x < cfg.ranks) {
    const int src = threadIdx.x;
    const uint64_t v = dev::wait_nonzero(dev::dispatch_flags(cfg.layout, dev::local_slot(c)) + src, cfg.timeout_ns);
    if (v == 0) {
      report(c.error, ErrorKind::kDispatchTimeout, c.slot, src, 0);
      s.fail = 1;
    } else if (v - 1 > static_cast<uint64_t>(cfg.max_tokens)) {
      report(c.error, ErrorKind::kBadTokenCount, c.slot, src, static_cast<uint32_t>(v - 1));
      s.fail = 1;
    } else {
      s.tokens[src] = static_cast<int>(v - 1);
    }
  }
  __syncthreads();
  return s.fail == 0;
}

__device__ __forceinline__ uint32_t warp_inclusive_scan(uint32_t v) {
  const int lane = threadIdx.x % kWarp;
#pragma unroll
  for (int o = 1; o < kWarp; o *= 2) {
    const uint32_t n = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v += n;
  }
  return v;
}

// bits[e][w]: bit q % 32 of word q / 32 set when received token q = src * max_tokens + t
// chose local expert e. A row's place within its expert is then the number of set bits
// before it: (source rank, source index) order without sorting.
__device__ void build_bitmaps(const Common& c, const RecvShared& s, uint32_t* bits, int words) {
  const Config& cfg = c.cfg;
  const int el = cfg.local_experts, first = cfg.rank * el, q_end = cfg.ranks * cfg.max_tokens;
  for (int i = threadIdx.x; i < el * words; i += blockDim.x) bits[i] = 0;
  __syncthreads();
  uint8_t* slot = dev::local_slot(c);
  for (int q = threadIdx.x; q < q_end; q += blockDim.x) {
    const int src = q / cfg.max_tokens, t = q - src * cfg.max_tokens;
    if (t >= s.tokens[src]) continue;
    const auto* ids = reinterpret_cast<const int32_t*>(dev::recv_row(cfg, slot, src, t) + cfg.layout.meta_offset);
    for (int j = 0; j < cfg.top_k; ++j) {
      const int e = __ldcg(ids + j) - first;
      if (static_cast<unsigned>(e) < static_cast<unsigned>(el)) atomicOr(&bits[e * words + (q >> 5)], 1u << (q & 31));
    }
  }
  __syncthreads();
}

// pre[e][w] = set bits of expert e in words before w; off[e] = first row of expert e
// (off[el] = rows in all). One warp per expert, then warp 0 scans the experts.
__device__ void scan_bitmaps(const uint32_t* bits, uint32_t* pre, int32_t* off, int el, int words) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  for (int e = warp; e < el; e += blockDim.x / kWarp) {
    uint32_t carry = 0;
    for (int w0 = 0; w0 < words; w0 += kWarp) {
      const int w = w0 + lane;
      const uint32_t n = w < words ? __popc(bits[e * words + w]) : 0;
      const uint32_t incl = warp_inclusive_scan(n);
      if (w < words) pre[e * words + w] = carry + incl - n;
      carry += __shfl_sync(0xffffffffu, incl, kWarp - 1);
    }
    if (lane == 0) off[e + 1] = static_cast<int32_t>(carry);
  }
  __syncthreads();
  if (warp == 0) {
    uint32_t carry = 0;
    for (int e0 = 0; e0 < el; e0 += kWarp) {
      const int e = e0 + lane;
      const uint32_t n = e < el ? static_cast<uint32_t>(off[e + 1]) : 0;
      const uint32_t incl = warp_inclusive_scan(n);
      if (e < el) off[e + 1] = static_cast<int32_t>(carry + incl);
      carry += __shfl_sync(0xffffffffu, incl, kWarp - 1);
    }
    if (lane == 0) off[0] = 0;
  }
  __syncthreads();
}

// One warp copies a received row (codes + scales, or bf16) into output row `row`.
__device__ void copy_row(const Common& c, const uint8_t* src, int row) {
  const Config& cfg = c.cfg;
  const int lane = threadIdx.x % kWarp;
  const int64_t bytes = cfg.fp8 ? cfg.hidden : 2 * static_cast<int64_t>(cfg.hidden);
  uint8_t* dst = static_cast<uint8_t*>(c.buf.tokens) + static_cast<int64_t>(row) * bytes;
  if (bytes % 16 == 0) {
    for (int64_t i = lane; i < bytes / 16; i += kWarp)
      reinterpret_cast<uint4*>(dst)[i] = __ldcg(reinterpret_cast<const uint4*>(src) + i);
  } else {
    for (int64_t i = lane; i < bytes / 2; i += kWarp)
      reinterpret_cast<uint16_t*>(dst)[i] = __ldcg(reinterpret_cast<const unsigned short*>(src) + i);
  }
  if (!cfg.fp8) return;
  const int groups = cfg.hidden / kQuantGroup;
  const auto* ss = reinterpret_cast<const float*>(src + cfg.layout.scale_offset);
  float* ds = c.buf.scales + static_cast<int64_t>(row) * groups;
  for (int i = lane; i < groups; i += kWarp) ds[i] = __ldcg(ss + i);
}

// One warp per received token slot q: its rows (one per local expert, ascending), the
// per-row records for combine, and row_of_pair[q] (-1 past its local experts).
__device__ void place_token(const Common& c, const RecvShared& s, const uint32_t* bits, const uint32_t* pre,
                            const int32_t* off, int words, int q) {
  const Config& cfg = c.cfg;
  const int lane = threadIdx.x % kWarp;
  const int src = q / cfg.max_tokens, t = q - src * cfg.max_tokens;
  int32_t* rop = c.buf.row_of_pair + static_cast<int64_t>(q) * cfg.kmax;
  if (t >= s.tokens[src]) {
    if (lane < cfg.kmax) rop[lane] = -1;
    return;
  }
  const uint8_t* row = dev::recv_row(cfg, dev::local_slot(c), src, t);
  const auto* ids = reinterpret_cast<const int32_t*>(row + cfg.layout.meta_offset);
  const auto* weights = reinterpret_cast<const float*>(row + cfg.layout.meta_offset) + cfg.top_k;
  const int el = cfg.local_experts;
  int e = el;
  float w = 0.f;
  if (lane < cfg.top_k) {
    e = __ldcg(ids + lane) - cfg.rank * el;
    if (static_cast<unsigned>(e) >= static_cast<unsigned>(el)) e = el;
    else w = __ldcg(weights + lane);
  }
  const bool local = e < el;
  int l = 0;  // place among the token's local experts, ascending (ids are distinct)
  for (int j = 0; j < cfg.top_k; ++j) l += __shfl_sync(0xffffffffu, e, j) < e;
  const uint32_t locals = __ballot_sync(0xffffffffu, local);
  int dst = -1;
  if (local) {
    const int word = q >> 5;
    const uint32_t before = bits[e * words + word] & ((1u << (q & 31)) - 1u);
    dst = off[e] + static_cast<int>(pre[e * words + word] + __popc(before));
    if (l < cfg.kmax) rop[l] = dst;
    c.buf.row_src[dst] = src;
    c.buf.row_index[dst] = t;
    c.buf.row_weight[dst] = w;
  }
  if (lane >= __popc(locals) && lane < cfg.kmax) rop[lane] = -1;
  for (uint32_t m = locals; m != 0; m &= m - 1) copy_row(c, row, __shfl_sync(0xffffffffu, dst, __ffs(m) - 1));
}

// Every block waits for all flags and computes the whole layout itself (a few thousand
// ids, from L2), then its warps place their share of the received tokens.
__global__ void __launch_bounds__(kRecvThreads) dispatch_recv_kernel(Common c) {
  extern __shared__ __align__(16) uint32_t smem[];
  __shared__ RecvShared s;
  if (!wait_sources(c, s)) return;
  const Config& cfg = c.cfg;
  const int q_end = cfg.ranks * cfg.max_tokens, words = (q_end + 31) / 32, el = cfg.local_experts;
  uint32_t* bits = smem;
  uint32_t* pre = bits + el * words;
  auto* off = reinterpret_cast<int32_t*>(pre + el * words);
  build_bitmaps(c, s, bits, words);
  scan_bitmaps(bits, pre, off, el, words);
  if (blockIdx.x == 0) {
    for (int e = threadIdx.x; e <= el; e += blockDim.x) {
      c.buf.offsets[e] = off[e];
      if (e < el) c.buf.counts[e] = off[e + 1] - off[e];
    }
    if (threadIdx.x < cfg.ranks) c.buf.recv_tokens[threadIdx.x] = s.tokens[threadIdx.x];
  }
  const int warp = threadIdx.x / kWarp;
  for (int q = blockIdx.x * kRecvWarps + warp; q < q_end; q += gridDim.x * kRecvWarps)
    place_token(c, s, bits, pre, off, words, q);
}

int sm_count() {
  int device = 0, sms = 0;
  AFDKIT_CUDA_CHECK(cudaGetDevice(&device));
  AFDKIT_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

}  // namespace

int64_t dispatch_recv_smem_bytes(const Config& cfg) {
  const int64_t words = (static_cast<int64_t>(cfg.ranks) * cfg.max_tokens + 31) / 32;
  return (2 * cfg.local_experts * words + cfg.local_experts + 1) * 4;
}

void dispatch_send(const Common& c, const DispatchSendArgs& a, cudaStream_t stream) {
  const Config& cfg = c.cfg;
  AFDKIT_CHECK(a.tokens >= 0 && a.tokens <= cfg.max_tokens, "dispatch_send: ", a.tokens, " tokens exceed ",
               cfg.max_tokens);
  AFDKIT_CHECK(reinterpret_cast<uintptr_t>(a.x) % 16 == 0 || a.tokens == 0,
               "dispatch_send: x must be 16-byte aligned");
  const bool vec = cfg.hidden % 8 == 0;
  const dim3 grid(static_cast<unsigned>(a.tokens > 0 ? a.tokens : 1),
                  static_cast<unsigned>((cfg.hidden + kSendChunk - 1) / kSendChunk));
  dispatch_send_kernel<<<grid, kSendThreads, 0, stream>>>(c, a, vec);
  AFDKIT_CHECK_LAUNCH();
}

void dispatch_recv(const Common& c, cudaStream_t stream) {
  const Config& cfg = c.cfg;
  const int64_t smem = dispatch_recv_smem_bytes(cfg);
  int device = 0, limit = 0;
  AFDKIT_CUDA_CHECK(cudaGetDevice(&device));  // the caller's DeviceGuard made the buffers' device current
  AFDKIT_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  AFDKIT_CHECK(smem + static_cast<int64_t>(sizeof(RecvShared)) <= limit, "dispatch_recv: the layout needs ", smem,
               " bytes of shared memory (local experts x ranks x max_tokens too large), the device has ", limit);
  if (smem > 48 * 1024)
    AFDKIT_CUDA_CHECK(cudaFuncSetAttribute(dispatch_recv_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(smem)));
  const int sms = sm_count();
  const int q_end = cfg.ranks * cfg.max_tokens;
  const int blocks = std::max(1, std::min((q_end + kRecvWarps - 1) / kRecvWarps, 2 * sms));
  dispatch_recv_kernel<<<blocks, kRecvThreads, smem, stream>>>(c);
  AFDKIT_CHECK_LAUNCH();
}

}  // namespace afdkit::moe::ipc
