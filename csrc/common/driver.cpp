#include "common/driver.h"

#include <cuda_runtime_api.h>

#include <mutex>
#include <string>
#include <unordered_map>

#include "common/errors.h"

namespace afdkit {

void* driver_entry_point(const char* name) {
  static std::mutex mu;
  static std::unordered_map<std::string, void*> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(name);
  if (it != cache.end()) return it->second;
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult status = cudaDriverEntryPointSymbolNotFound;
  cudaError_t err = cudaGetDriverEntryPointByVersion(name, &fn, 12000, cudaEnableDefault, &status);
  if (err != cudaSuccess || status != cudaDriverEntryPointSuccess || fn == nullptr) {
    cudaGetLastError();  // do not leave a sticky-looking error for the next check
    AFDKIT_THROW(CudaError, "CUDA driver entry point '", name, "' is unavailable (",
                 cudaGetErrorString(err), ", query status ", static_cast<int>(status),
                 "); is an NVIDIA driver for CUDA >= 12.0 installed?");
  }
  cache.emplace(name, fn);
  return fn;
}

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

}  // namespace afdkit
