// Device helpers of the CUDA IPC dispatcher (dispatch_ipc.h): system-scope flags with a
// bounded wait, the last-block pattern, error reports, addresses inside the buffers.
#pragma once
#include <cuda_bf16.h>

#include <cstdint>

#include "moe/dispatch_ipc.h"

namespace afdkit::moe::ipc::dev {

__device__ __forceinline__ uint64_t ld_acquire_sys(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void st_release_sys(uint64_t* p, uint64_t v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ void st_relaxed_sys(uint64_t* p, uint64_t v) {
  asm volatile("st.relaxed.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

// Orders this thread's earlier accesses (and, cumulatively, those it has observed)
// before its later ones, for every observer in the system (peer GPUs included).
__device__ __forceinline__ void fence_acq_rel_sys() { asm volatile("fence.acq_rel.sys;" ::: "memory"); }

__device__ __forceinline__ uint64_t globaltimer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Spins until *flag != 0 (acquire, system scope); returns it, or 0 after timeout_ns.
__device__ __forceinline__ uint64_t wait_nonzero(const uint64_t* flag, uint64_t timeout_ns) {
  uint64_t v = ld_acquire_sys(flag);
  if (v != 0) return v;
  const uint64_t start = globaltimer_ns();
  while (true) {
    v = ld_acquire_sys(flag);
    if (v != 0) return v;
    if (globaltimer_ns() - start > timeout_ns) return 0;
    __nanosleep(64);
  }
}

// The error word lives in mapped host memory; the host only ever needs one error, so a
// plain system-scope store is enough (PCIe atomics on host memory are not guaranteed).
__device__ __forceinline__ void report(uint64_t* error, ErrorKind kind, int slot, int peer, uint32_t value) {
  const uint64_t word = static_cast<uint64_t>(kind) << 56 | static_cast<uint64_t>(slot & 0xFF) << 48 |
                        static_cast<uint64_t>(peer & 0xFFFF) << 32 | value;
  st_relaxed_sys(error, word);
}

// The last-block pattern: every block's thread 0 calls this once after its block's
// stores (and a __syncthreads); true in exactly one block, which then also sees every
// other block's stores (fence - atomic - fence synchronization) and resets the counter
// for the next launch (CUDA graph replays reuse it).
__device__ __forceinline__ bool arrive_last(uint32_t* counter, unsigned blocks) {
  fence_acq_rel_sys();  // release: this block's stores (its threads synchronized with thread 0 by the barrier)
  const uint32_t done = atomicAdd(counter, 1u);
  if (done != blocks - 1) return false;
  fence_acq_rel_sys();  // acquire: the other blocks' released stores
  *counter = 0;         // ordered before the next launch on this stream by the kernel boundary
  return true;
}

__device__ __forceinline__ uint8_t* slot_base(const Common& c, int rank) {
  return reinterpret_cast<uint8_t*>(c.peers[rank]) + static_cast<int64_t>(c.slot) * c.cfg.layout.slot_bytes;
}

__device__ __forceinline__ uint8_t* local_slot(const Common& c) {
  return c.local + static_cast<int64_t>(c.slot) * c.cfg.layout.slot_bytes;
}

__device__ __forceinline__ uint64_t* dispatch_flags(const Layout& l, uint8_t* slot) {
  return reinterpret_cast<uint64_t*>(slot + l.dispatch_flags_offset);
}

__device__ __forceinline__ uint64_t* combine_flags(const Layout& l, uint8_t* slot) {
  return reinterpret_cast<uint64_t*>(slot + l.combine_flags_offset);
}

// Row `t` of source `src` in a slot's dispatch receive area.
__device__ __forceinline__ uint8_t* recv_row(const Config& c, uint8_t* slot, int src, int t) {
  return slot + c.layout.recv_offset + (static_cast<int64_t>(src) * c.max_tokens + t) * c.layout.row_bytes;
}

// Row `t` (a token of the slot's owner) of expert rank `rank` in a slot's combine area.
__device__ __forceinline__ uint8_t* combine_row(const Config& c, uint8_t* slot, int rank, int t) {
  return slot + c.layout.combine_offset + (static_cast<int64_t>(rank) * c.max_tokens + t) * c.layout.combine_row_bytes;
}

// Eight bf16 in a 16-byte vector <-> fp32.
__device__ __forceinline__ void unpack8(const uint4& v, float (&f)[8]) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(w[i] << 16);
    f[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
  }
}

__device__ __forceinline__ uint4 pack8(const float (&f)[8]) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    __nv_bfloat162 h = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
    w[i] = *reinterpret_cast<uint32_t*>(&h);
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

}  // namespace afdkit::moe::ipc::dev
