// One rank's symmetric buffer of the CUDA IPC dispatcher: device memory that every
// rank of the host maps (cudaIpcGetMemHandle / cudaIpcOpenMemHandle), plus an error
// word in mapped host memory that kernels write and the host reads without a CUDA call.
// The handle exchange itself is the caller's (Python: torch.distributed.all_gather_object).
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace afdkit::moe::ipc {

class IpcBuffer {
 public:
  // cudaMalloc(nbytes) on `device`, zeroed and synchronized before this returns (peers
  // may write into it as soon as they have the handle).
  IpcBuffer(size_t nbytes, int device);
  ~IpcBuffer();
  IpcBuffer(const IpcBuffer&) = delete;
  IpcBuffer& operator=(const IpcBuffer&) = delete;

  // The 64-byte CUDA IPC handle of this buffer.
  std::string handle() const;
  // Maps `rank`'s buffer from its handle; returns its address in this process.
  uintptr_t open_peer(int rank, const std::string& handle);
  // Unmaps every peer's buffer (idempotent); this buffer stays.
  void close_peers();
  // Closes every peer mapping, then frees this buffer and the error word (idempotent).
  // Peers must have unmapped this buffer first (the caller's barrier).
  void close();

  uintptr_t base() const { return reinterpret_cast<uintptr_t>(base_); }
  size_t nbytes() const { return nbytes_; }
  int device() const { return device_; }
  bool closed() const { return base_ == nullptr; }
  // The error word: its device address (for kernels), its value, reset to 0.
  uintptr_t error_word() const { return reinterpret_cast<uintptr_t>(error_device_); }
  uint64_t error() const;
  void clear_error();

 private:
  void* base_ = nullptr;
  size_t nbytes_ = 0;
  int device_ = 0;
  uint64_t* error_host_ = nullptr;
  uint64_t* error_device_ = nullptr;
  std::vector<void*> peers_;  // mapped peer bases, closed by close()
};

}  // namespace afdkit::moe::ipc
