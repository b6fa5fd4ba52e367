// Expert-parallel dispatch/combine between the GPUs of one host over CUDA IPC (NVLink).
//
// Every rank owns one symmetric buffer (ipc_buffer.h) that all ranks map; kernels store
// into peers' buffers directly and publish with system-scope release flags. The byte
// layout of a buffer is computed in one place, afdkit.dispatch.ipc.ipc_layout (Python),
// and handed over as `Layout`; docs/moe.md ("CUDA IPC backend") describes the protocol
// and why one buffer set per in-flight dispatch suffices. Per call (on one stream):
//   dispatch_send  quantize each token once, store it into the receive area of every
//                  rank owning one of its experts (its top-k meta into every rank's);
//                  the last block resets this rank's combine flags and sets flag = T + 1
//                  at every rank.
//   dispatch_recv  wait for all dispatch flags (bounded), lay the rows out expert-major
//                  ((local expert, source rank, source index) order) into fixed buffers.
//   combine_send   per received token, sum its local rows weighted in fp32 (ascending
//                  expert), store one bf16 partial into the source's combine area; the
//                  last block resets this rank's dispatch flags and sets combine flags.
//   combine_recv   wait for all combine flags, add the partials of the ranks holding
//                  the token's experts in rank order (fp32), round to bf16 once.
// No host synchronization anywhere: everything is graph-capturable. Waits that run past
// `timeout_ns` write an error word (mapped host memory) that the host reads.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace afdkit::moe::ipc {

constexpr int kMaxRanks = 32;  // destination sets are 32-bit masks
constexpr int kMaxTopK = 16;
constexpr int kQuantGroup = 128;

// Byte offsets of one rank's buffer (identical on every rank). A buffer holds `depth`
// slots of `slot_bytes`; inside a slot: flags, then the areas.
struct Layout {
  int64_t token_bytes = 0;        // per dispatch row: fp8 codes (hidden) or bf16 (2 * hidden), 16-aligned
  int64_t scale_offset = 0;       // per row: fp32 scales [hidden / 128] (fp8 only)
  int64_t meta_offset = 0;        // per row: top-k ids int32 [k], then weights fp32 [k]
  int64_t row_bytes = 0;          // one dispatch row, a multiple of 16
  int64_t combine_row_bytes = 0;  // one bf16 partial row, a multiple of 16
  int64_t dispatch_flags_offset = 0;  // uint64 [ranks]: source s wrote T_s + 1 (0 = empty)
  int64_t combine_flags_offset = 0;   // uint64 [ranks]: rank d wrote 1 (0 = empty)
  int64_t recv_offset = 0;        // dispatch rows [ranks (source)][max_tokens]
  int64_t combine_offset = 0;     // partial rows [ranks (expert rank)][max_tokens]
  int64_t slot_bytes = 0;
  int64_t total_bytes = 0;
};

struct Config {
  int rank = 0, ranks = 0, max_tokens = 0, hidden = 0, top_k = 0;
  int local_experts = 0, kmax = 0;  // kmax = min(top_k, local_experts)
  int num_experts = 0;
  bool fp8 = true;
  uint64_t timeout_ns = 0;
  Layout layout;
};

// Local device buffers of one slot (not shared with peers).
struct SlotBuffers {
  void* tokens = nullptr;          // [capacity, hidden] e4m3 or bf16
  float* scales = nullptr;         // [capacity, hidden / 128] (fp8)
  int32_t* counts = nullptr;       // [local_experts]
  int32_t* offsets = nullptr;      // [local_experts + 1]
  int32_t* recv_tokens = nullptr;  // [ranks]: tokens each source sent this call
  int32_t* row_of_pair = nullptr;  // [ranks * max_tokens, kmax]: row of (source token, l-th local expert) or -1
  int32_t* row_src = nullptr;      // [capacity] source rank of each row
  int32_t* row_index = nullptr;    // [capacity] source token index of each row
  float* row_weight = nullptr;     // [capacity] top-k weight of each row
  uint32_t* dest_mask = nullptr;   // [max_tokens] ranks each own token went to
  uint32_t* counters = nullptr;    // [2] last-block counters: dispatch_send, combine_send
};

// Errors the kernels report through the error word: kind << 56 | slot << 48 | peer << 32 | value.
enum class ErrorKind : uint64_t {
  kNone = 0,
  kDispatchTimeout = 1,  // peer = the rank whose dispatch flag never came
  kCombineTimeout = 2,   // peer = the rank whose combine flag never came
  kBadExpert = 3,        // value = the expert id (topk_ids out of range)
  kBadTokenCount = 4,    // peer sent value tokens (> max_tokens)
  kShortExpertOut = 5,   // value = a row past expert_out's rows
};

struct Common {
  Config cfg;
  int slot = 0;
  uint8_t* local = nullptr;              // this rank's buffer
  const int64_t* peers = nullptr;        // [ranks] device addresses of every rank's buffer (own included)
  uint64_t* error = nullptr;             // device address of the error word
  SlotBuffers buf;
};

struct DispatchSendArgs {
  const void* x = nullptr;  // [tokens, hidden] bf16, rows contiguous, 16-byte aligned
  const void* ids = nullptr;  // [tokens, top_k] int32 or int64
  bool ids64 = false;
  const float* weights = nullptr;  // [tokens, top_k]
  int tokens = 0;
};

struct CombineSendArgs {
  const void* expert_out = nullptr;  // [rows, hidden] bf16, last dim contiguous
  int64_t rows = 0, row_stride = 0;  // elements
  bool vec = false;                  // 16-byte loads possible (aligned rows, hidden % 8 == 0)
};

struct CombineRecvArgs {
  void* out = nullptr;  // [tokens, hidden] bf16 contiguous
  int tokens = 0;
};

void dispatch_send(const Common& c, const DispatchSendArgs& a, cudaStream_t stream);
void dispatch_recv(const Common& c, cudaStream_t stream);
void combine_send(const Common& c, const CombineSendArgs& a, cudaStream_t stream);
void combine_recv(const Common& c, const CombineRecvArgs& a, cudaStream_t stream);

// Dynamic shared memory of dispatch_recv (per-expert bitmaps of received tokens);
// the launcher refuses configurations above the device's limit.
int64_t dispatch_recv_smem_bytes(const Config& cfg);

}  // namespace afdkit::moe::ipc
