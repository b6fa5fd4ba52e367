#include "mesh/gpu.h"

#include <cuda.h>

#include <cstring>

#include "common/cuda_check.h"
#include "common/driver.h"
#include "common/errors.h"

namespace afdkit::mesh::gpu {

std::string export_handle(void* ptr, size_t* offset) {
  using GetRange = CUresult (*)(CUdeviceptr*, size_t*, CUdeviceptr);
  static auto get_range = driver_fn<GetRange>("cuMemGetAddressRange");
  CUdeviceptr base = 0;
  size_t size = 0;
  if (get_range(&base, &size, reinterpret_cast<CUdeviceptr>(ptr)) != CUDA_SUCCESS)
    AFDKIT_THROW(ValueError, "afdkit.mesh: cannot find the CUDA allocation holding ", ptr,
                 " (is it device memory from cudaMalloc or torch?)");
  cudaIpcMemHandle_t h;
  AFDKIT_CUDA_CHECK(cudaIpcGetMemHandle(&h, reinterpret_cast<void*>(base)));
  *offset = reinterpret_cast<uintptr_t>(ptr) - static_cast<uintptr_t>(base);
  return std::string(reinterpret_cast<const char*>(&h), sizeof(h));
}

void* open_handle(const std::string& handle, int device) {
  if (handle.size() != sizeof(cudaIpcMemHandle_t))
    AFDKIT_THROW(ValueError, "afdkit.mesh: malformed CUDA IPC handle of ", handle.size(), " bytes");
  cudaIpcMemHandle_t h;
  std::memcpy(&h, handle.data(), sizeof(h));
  int previous = 0;
  AFDKIT_CUDA_CHECK(cudaGetDevice(&previous));
  if (device >= 0 && device != previous) AFDKIT_CUDA_CHECK(cudaSetDevice(device));
  void* base = nullptr;
  cudaError_t err = cudaIpcOpenMemHandle(&base, h, cudaIpcMemLazyEnablePeerAccess);
  if (device >= 0 && device != previous) cudaSetDevice(previous);
  AFDKIT_CUDA_CHECK(err);
  return base;
}

void close_handle(void* base) {
  if (base) cudaIpcCloseMemHandle(base);
}

void copy_async(void* dst, const void* src, size_t nbytes, cudaStream_t stream) {
  AFDKIT_CUDA_CHECK(cudaMemcpyAsync(dst, src, nbytes, cudaMemcpyDefault, stream));
}

void write_value(cudaStream_t stream, uint64_t* word, uint64_t value) {
  using WriteValue = CUresult (*)(CUstream, CUdeviceptr, cuuint64_t, unsigned int);
  static auto fn = driver_fn<WriteValue>("cuStreamWriteValue64");
  CUresult r = fn(reinterpret_cast<CUstream>(stream), reinterpret_cast<CUdeviceptr>(device_address(word)), value,
                  CU_STREAM_WRITE_VALUE_DEFAULT);
  if (r != CUDA_SUCCESS) AFDKIT_THROW(CudaError, "cuStreamWriteValue64 failed with CUresult ", static_cast<int>(r));
}

void wait_value(cudaStream_t stream, const uint64_t* word, uint64_t value) {
  using WaitValue = CUresult (*)(CUstream, CUdeviceptr, cuuint64_t, unsigned int);
  static auto fn = driver_fn<WaitValue>("cuStreamWaitValue64");
  CUresult r = fn(reinterpret_cast<CUstream>(stream), reinterpret_cast<CUdeviceptr>(device_address(word)), value,
                  CU_STREAM_WAIT_VALUE_GEQ);
  if (r != CUDA_SUCCESS) AFDKIT_THROW(CudaError, "cuStreamWaitValue64 failed with CUresult ", static_cast<int>(r));
}

uint64_t* device_address(const uint64_t* word) {
  cudaPointerAttributes attr{};
  AFDKIT_CUDA_CHECK(cudaPointerGetAttributes(&attr, word));
  if (attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged)
    return const_cast<uint64_t*>(word);
  if (attr.type == cudaMemoryTypeHost && attr.devicePointer) return static_cast<uint64_t*>(attr.devicePointer);
  AFDKIT_THROW(ValueError, "afdkit.mesh: a stream-ordered signal must live in device memory or in pinned "
                           "(cudaHostAlloc / cudaHostRegister) host memory; ", static_cast<const void*>(word),
               " is pageable");
}

uint64_t read_word(const uint64_t* word) {
  uint64_t v = 0;
  AFDKIT_CUDA_CHECK(cudaMemcpy(&v, word, sizeof(v), cudaMemcpyDefault));
  return v;
}

cudaEvent_t record_event(cudaStream_t stream) {
  cudaEvent_t ev = nullptr;
  AFDKIT_CUDA_CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
  cudaError_t err = cudaEventRecord(ev, stream);
  if (err != cudaSuccess) cudaEventDestroy(ev);
  AFDKIT_CUDA_CHECK(err);
  return ev;
}

bool event_done(cudaEvent_t ev) {
  cudaError_t err = cudaEventQuery(ev);
  if (err == cudaErrorNotReady) return false;
  AFDKIT_CUDA_CHECK(err);
  return true;
}

void destroy_event(cudaEvent_t ev) {
  if (ev) cudaEventDestroy(ev);
}

}  // namespace afdkit::mesh::gpu
