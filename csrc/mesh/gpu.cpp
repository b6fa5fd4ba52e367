#include "mesh/gpu.h"

#include <cuda.h>

#include <cstring>
#include <unordered_map>

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

namespace {
using WriteValueFn = CUresult (*)(CUstream, CUdeviceptr, cuuint64_t, unsigned int);
using WaitValueFn = CUresult (*)(CUstream, CUdeviceptr, cuuint64_t, unsigned int);
}  // namespace

void write_value_raw(cudaStream_t stream, uint64_t* word, uint64_t value, bool fence) {
  static auto fn = driver_fn<WriteValueFn>("cuStreamWriteValue64");
  // Always the default (fenced) write: CU_STREAM_WRITE_VALUE_NO_MEMORY_BARRIER is not
  // supported by the v2 stream memory-op API that CUDA 12+ resolves these names to
  // (the driver answers CUDA_ERROR_INVALID_VALUE, seen on H200s with driver 580).
  (void)fence;
  CUresult r = fn(reinterpret_cast<CUstream>(stream), reinterpret_cast<CUdeviceptr>(word), value,
                  CU_STREAM_WRITE_VALUE_DEFAULT);
  if (r != CUDA_SUCCESS)
    AFDKIT_THROW(CudaError, "cuStreamWriteValue64 of ", static_cast<void*>(word), " failed with CUresult ",
                 static_cast<int>(r));
}

void wait_value_raw(cudaStream_t stream, const uint64_t* word, uint64_t value) {
  static auto fn = driver_fn<WaitValueFn>("cuStreamWaitValue64");
  CUresult r = fn(reinterpret_cast<CUstream>(stream), reinterpret_cast<CUdeviceptr>(word), value,
                  CU_STREAM_WAIT_VALUE_GEQ);
  if (r != CUDA_SUCCESS)
    AFDKIT_THROW(CudaError, "cuStreamWaitValue64 of ", static_cast<const void*>(word), " failed with CUresult ",
                 static_cast<int>(r));
}

uint64_t* alloc_mapped_words(size_t n) {
  void* p = nullptr;
  AFDKIT_CUDA_CHECK(cudaHostAlloc(&p, n * sizeof(uint64_t), cudaHostAllocMapped | cudaHostAllocPortable));
  std::memset(p, 0, n * sizeof(uint64_t));
  return static_cast<uint64_t*>(p);
}

void free_mapped_words(uint64_t* words) {
  if (words) cudaFreeHost(words);
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

namespace {
// One non-blocking stream per (thread, device) for word reads/stores: cudaMemcpy would
// run on the legacy default stream and queue behind a pending stream wait-value there.
cudaStream_t word_stream(int device) {
  thread_local std::unordered_map<int, cudaStream_t> streams;
  auto it = streams.find(device);
  if (it != streams.end()) return it->second;
  cudaStream_t s = nullptr;
  AFDKIT_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  streams.emplace(device, s);
  return s;
}

// Makes the device of `ptr` current for the scope (restores the previous one).
struct DeviceScope {
  int previous = -1, device = -1;
  explicit DeviceScope(const void* ptr) {
    device = device_of(ptr);
    if (cudaGetDevice(&previous) != cudaSuccess) previous = -1;
    if (device >= 0 && device != previous) AFDKIT_CUDA_CHECK(cudaSetDevice(device));
    if (device < 0) device = previous;
  }
  ~DeviceScope() {
    if (previous >= 0 && device != previous) cudaSetDevice(previous);
  }
};
}  // namespace

int device_of(const void* ptr) {
  cudaPointerAttributes attr{};
  if (cudaPointerGetAttributes(&attr, ptr) != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  if (attr.type == cudaMemoryTypeUnregistered) return -1;
  return attr.device;
}

int current_device() {
  int d = -1;
  if (cudaGetDevice(&d) != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  return d;
}

void set_device(int device) {
  if (device >= 0 && current_device() != device) AFDKIT_CUDA_CHECK(cudaSetDevice(device));
}

uint64_t read_word(const uint64_t* word) {
  DeviceScope scope(word);
  cudaStream_t s = word_stream(scope.device);
  uint64_t v = 0;
  AFDKIT_CUDA_CHECK(cudaMemcpyAsync(&v, word, sizeof(v), cudaMemcpyDefault, s));
  AFDKIT_CUDA_CHECK(cudaStreamSynchronize(s));
  return v;
}

bool store_word(uint64_t* word, uint64_t value) {
  try {
    DeviceScope scope(word);
    cudaStream_t s = word_stream(scope.device);
    uint64_t v = value;
    if (cudaMemcpyAsync(word, &v, sizeof(v), cudaMemcpyDefault, s) != cudaSuccess) return false;
    return cudaStreamSynchronize(s) == cudaSuccess;
  } catch (const std::exception&) {
    return false;
  }
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
