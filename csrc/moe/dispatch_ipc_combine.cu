// The combine half of the CUDA IPC dispatcher (see dispatch_ipc.h): combine_send reduces
// each received token's local rows (weighted, fp32) into one bf16 partial stored into
// the source rank's combine area; combine_recv adds the partials of the ranks holding a
// token's experts in rank order and rounds once.
//
// The fp32 arithmetic is written with __fmul_rn/__fadd_rn so that nvcc cannot contract
// it into FMAs: the results are bit-identical to afdkit.dispatch.reference_combine.
#include <cuda_bf16.h>

#include <algorithm>

#include "common/cuda_check.h"
#include "moe/dispatch_ipc.cuh"

namespace afdkit::moe::ipc {
namespace {

using dev::arrive_last;
using dev::report;

constexpr int kThreads = 128;
constexpr int kChunk = kThreads * 8;  // channels per block: one 16-byte vector (8 bf16) per thread

// ---- combine_send -------------------------------------------------------------------------

struct SendShared {
  int rows[kMaxTopK];
  float weights[kMaxTopK];
  int n;
  bool last;
};

// Thread 0: the token's rows (ascending local expert: the reference's row order) and weights.
__device__ void token_rows(const Common& c, const CombineSendArgs& a, int q, SendShared& s) {
  const int32_t* rop = c.buf.row_of_pair + static_cast<int64_t>(q) * c.cfg.kmax;
  int n = 0;
  for (int l = 0; l < c.cfg.kmax; ++l) {
    const int row = rop[l];
    if (row < 0) break;
    if (row >= a.rows) {  // expert_out is shorter than the dispatch's rows
      if (blockIdx.y == 0) report(c.error, ErrorKind::kShortExpertOut, c.slot, c.cfg.rank, static_cast<uint32_t>(row));
      continue;
    }
    s.rows[n] = row;
    s.weights[n] = c.buf.row_weight[row];
    ++n;
  }
  s.n = n;
}

// Channels [8 * v, 8 * v + 8) of the partial sum: acc = sum_l w_l * y[row_l] in fp32.
template <bool kVec>
__device__ void reduce8(const CombineSendArgs& a, const SendShared& s, int hidden, int v, uint8_t* dst) {
  const auto* y = static_cast<const __nv_bfloat16*>(a.expert_out);
  float acc[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) acc[i] = 0.f;
  for (int l = 0; l < s.n; ++l) {
    const __nv_bfloat16* row = y + static_cast<int64_t>(s.rows[l]) * a.row_stride;
    const float w = s.weights[l];
    float f[8];
    if (kVec) {
      dev::unpack8(reinterpret_cast<const uint4*>(row)[v], f);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) f[i] = 8 * v + i < hidden ? __bfloat162float(row[8 * v + i]) : 0.f;
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = __fadd_rn(acc[i], __fmul_rn(f[i], w));
  }
  if (kVec) {
    reinterpret_cast<uint4*>(dst)[v] = dev::pack8(acc);
  } else {
    for (int i = 0; i < 8 && 8 * v + i < hidden; ++i)
      reinterpret_cast<__nv_bfloat16*>(dst)[8 * v + i] = __float2bfloat16_rn(acc[i]);
  }
}

// Last block: clear this rank's dispatch flags of the slot (dispatch_recv, the kernel
// before, read them), then tell every rank, own included, that its partials are stored.
__device__ void signal_combine(const Common& c) {
  const Config& cfg = c.cfg;
  uint64_t* dflags = dev::dispatch_flags(cfg.layout, dev::local_slot(c));
  for (int r = 0; r < cfg.ranks; ++r) dev::st_relaxed_sys(dflags + r, 0);
  dev::fence_acq_rel_sys();
  for (int i = 1; i <= cfg.ranks; ++i) {
    const int r = (cfg.rank + i) % cfg.ranks;
    dev::st_release_sys(dev::combine_flags(cfg.layout, dev::slot_base(c, r)) + cfg.rank, 1);
  }
}

// Grid (received-token blocks, channel chunks): blocks stride over the R * max_tokens
// token slots; slots past a source's count or without a local expert cost nothing.
template <bool kVec>
__global__ void __launch_bounds__(kThreads) combine_send_kernel(Common c, CombineSendArgs a) {
  __shared__ SendShared s;
  const Config& cfg = c.cfg;
  const int q_end = cfg.ranks * cfg.max_tokens;
  const int v = blockIdx.y * kThreads + threadIdx.x;
  const int vectors = (cfg.hidden + 7) / 8;
  for (int q = blockIdx.x; q < q_end; q += gridDim.x) {
    const int src = q / cfg.max_tokens, t = q - src * cfg.max_tokens;
    if (t >= c.buf.recv_tokens[src]) continue;  // uniform over the block
    if (threadIdx.x == 0) token_rows(c, a, q, s);
    __syncthreads();
    if (s.n > 0 && v < vectors)
      reduce8<kVec>(a, s, cfg.hidden, v, dev::combine_row(cfg, dev::slot_base(c, src), cfg.rank, t));
    __syncthreads();  // s is rewritten by the next token
  }
  if (threadIdx.x == 0) s.last = arrive_last(&c.buf.counters[1], gridDim.x * gridDim.y);
  __syncthreads();
  if (s.last && threadIdx.x == 0) signal_combine(c);
}

// ---- combine_recv -------------------------------------------------------------------------

// Grid (max(T, 1), channel chunks). Every block waits for all combine flags, also with
// no tokens: the wait is what lets the next dispatch reuse peers' receive areas.
template <bool kVec>
__global__ void __launch_bounds__(kThreads) combine_recv_kernel(Common c, CombineRecvArgs a) {
  __shared__ int fail;
  __shared__ uint32_t mask;
  const Config& cfg = c.cfg;
  uint8_t* slot = dev::local_slot(c);
  if (threadIdx.x == 0) fail = 0;
  __syncthreads();
  if (threadIdx.x < cfg.ranks) {
    const int r = threadIdx.x;
    if (dev::wait_nonzero(dev::combine_flags(cfg.layout, slot) + r, cfg.timeout_ns) == 0) {
      report(c.error, ErrorKind::kCombineTimeout, c.slot, r, 0);
      fail = 1;
    }
  }
  const int t = blockIdx.x;
  if (threadIdx.x == 0 && t < a.tokens) mask = c.buf.dest_mask[t];
  __syncthreads();
  if (fail || t >= a.tokens) return;
  const int v = blockIdx.y * kThreads + threadIdx.x;
  if (v >= (cfg.hidden + 7) / 8) return;
  float acc[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) acc[i] = 0.f;
  for (uint32_t m = mask; m != 0; m &= m - 1) {  // ascending rank: the reference's order
    const uint8_t* row = dev::combine_row(cfg, slot, __ffs(m) - 1, t);
    float f[8];
    if (kVec) {
      dev::unpack8(__ldcg(reinterpret_cast<const uint4*>(row) + v), f);
    } else {
      const auto* p = reinterpret_cast<const unsigned short*>(row);
#pragma unroll
      for (int i = 0; i < 8; ++i)
        f[i] = 8 * v + i < cfg.hidden ? __uint_as_float(static_cast<uint32_t>(__ldcg(p + 8 * v + i)) << 16) : 0.f;
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = __fadd_rn(acc[i], f[i]);
  }
  auto* out = static_cast<__nv_bfloat16*>(a.out) + static_cast<int64_t>(t) * cfg.hidden;
  if (kVec) {
    reinterpret_cast<uint4*>(out)[v] = dev::pack8(acc);
  } else {
    for (int i = 0; i < 8 && 8 * v + i < cfg.hidden; ++i) out[8 * v + i] = __float2bfloat16_rn(acc[i]);
  }
}

unsigned chunks(int hidden) { return static_cast<unsigned>((hidden + kChunk - 1) / kChunk); }

}  // namespace

void combine_send(const Common& c, const CombineSendArgs& a, cudaStream_t stream) {
  const Config& cfg = c.cfg;
  const bool vec = a.vec && cfg.hidden % 8 == 0 && reinterpret_cast<uintptr_t>(a.expert_out) % 16 == 0 &&
                   a.row_stride % 8 == 0;
  int device = 0, sms = 0;
  AFDKIT_CUDA_CHECK(cudaGetDevice(&device));
  AFDKIT_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int q_end = cfg.ranks * cfg.max_tokens;
  const unsigned ch = chunks(cfg.hidden);
  // About 8 blocks per SM in all; each block strides over the token slots.
  const int per_chunk = std::max(1, std::min(q_end, 8 * sms / static_cast<int>(ch)));
  const dim3 grid(static_cast<unsigned>(per_chunk), ch);
  if (vec) {
    combine_send_kernel<true><<<grid, kThreads, 0, stream>>>(c, a);
  } else {
    combine_send_kernel<false><<<grid, kThreads, 0, stream>>>(c, a);
  }
  AFDKIT_CHECK_LAUNCH();
}

void combine_recv(const Common& c, const CombineRecvArgs& a, cudaStream_t stream) {
  const Config& cfg = c.cfg;
  AFDKIT_CHECK(a.tokens >= 0 && a.tokens <= cfg.max_tokens, "combine_recv: ", a.tokens, " tokens exceed ",
               cfg.max_tokens);
  const bool vec = cfg.hidden % 8 == 0 && reinterpret_cast<uintptr_t>(a.out) % 16 == 0;
  const dim3 grid(static_cast<unsigned>(a.tokens > 0 ? a.tokens : 1), chunks(cfg.hidden));
  if (vec) {
    combine_recv_kernel<true><<<grid, kThreads, 0, stream>>>(c, a);
  } else {
    combine_recv_kernel<false><<<grid, kThreads, 0, stream>>>(c, a);
  }
  AFDKIT_CHECK_LAUNCH();
}

}  // namespace afdkit::moe::ipc
