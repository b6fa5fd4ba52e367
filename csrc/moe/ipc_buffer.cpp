#include "moe/ipc_buffer.h"

#include <cuda_runtime_api.h>

#include <cstring>

#include "common/cuda_check.h"
#include "common/errors.h"
#include "mesh/gpu.h"

namespace afdkit::moe::ipc {

namespace {
// Makes `device` current for the scope, restoring the caller's device afterwards.
struct OnDevice {
  int previous = -1;
  explicit OnDevice(int device) {
    AFDKIT_CUDA_CHECK(cudaGetDevice(&previous));
    if (previous != device) AFDKIT_CUDA_CHECK(cudaSetDevice(device));
  }
  ~OnDevice() {
    int now = -1;
    if (cudaGetDevice(&now) == cudaSuccess && now != previous) cudaSetDevice(previous);
  }
};
}  // namespace

IpcBuffer::IpcBuffer(size_t nbytes, int device) : nbytes_(nbytes), device_(device) {
  AFDKIT_CHECK(nbytes > 0, "afdkit.dispatch.ipc: buffer size must be > 0");
  OnDevice on(device);
  AFDKIT_CUDA_CHECK(cudaMalloc(&base_, nbytes));
  cudaError_t err = cudaMemset(base_, 0, nbytes);
  if (err == cudaSuccess) err = cudaHostAlloc(reinterpret_cast<void**>(&error_host_), sizeof(uint64_t),
                                              cudaHostAllocMapped | cudaHostAllocPortable);
  if (err == cudaSuccess) {
    *error_host_ = 0;
    err = cudaHostGetDevicePointer(reinterpret_cast<void**>(&error_device_), error_host_, 0);
  }
  if (err == cudaSuccess) err = cudaDeviceSynchronize();
  if (err != cudaSuccess) {
    close();
    AFDKIT_CUDA_CHECK(err);
  }
}

IpcBuffer::~IpcBuffer() {
  try {
    close();
  } catch (...) {
  }
}

std::string IpcBuffer::handle() const {
  AFDKIT_CHECK(base_ != nullptr, "afdkit.dispatch.ipc: the buffer is closed");
  size_t offset = 0;
  std::string h = mesh::gpu::export_handle(base_, &offset);
  AFDKIT_CHECK(offset == 0, "afdkit.dispatch.ipc: the buffer is not the start of its allocation");
  return h;
}

uintptr_t IpcBuffer::open_peer(int rank, const std::string& handle) {
  AFDKIT_CHECK(base_ != nullptr, "afdkit.dispatch.ipc: the buffer is closed");
  void* p = nullptr;
  try {
    p = mesh::gpu::open_handle(handle, device_);
  } catch (const std::exception& e) {
    AFDKIT_THROW(CudaError, "afdkit.dispatch.ipc: cannot map rank ", rank, "'s buffer on cuda:", device_,
                 " (are the GPUs peer-capable, e.g. over NVLink?): ", e.what());
  }
  peers_.push_back(p);
  return reinterpret_cast<uintptr_t>(p);
}

void IpcBuffer::close_peers() {
  if (peers_.empty()) return;
  OnDevice on(device_);
  for (void* p : peers_) mesh::gpu::close_handle(p);
  peers_.clear();
}

void IpcBuffer::close() {
  if (!peers_.empty() || base_ != nullptr) {
    OnDevice on(device_);
    for (void* p : peers_) mesh::gpu::close_handle(p);
    peers_.clear();
    if (base_ != nullptr) cudaFree(base_);
    base_ = nullptr;
  }
  if (error_host_ != nullptr) {
    cudaFreeHost(error_host_);
    error_host_ = nullptr;
    error_device_ = nullptr;
  }
}

uint64_t IpcBuffer::error() const {
  if (error_host_ == nullptr) return 0;
  return *static_cast<volatile uint64_t*>(error_host_);
}

void IpcBuffer::clear_error() {
  if (error_host_ != nullptr) *static_cast<volatile uint64_t*>(error_host_) = 0;
}

}  // namespace afdkit::moe::ipc
