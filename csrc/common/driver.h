// Lazy CUDA driver entry points. afdkit never links libcuda: the static cudart
// resolves driver symbols (cuTensorMapEncodeTiled, cuStreamWriteValue32, ...) at
// first use, so the module imports on machines without a GPU driver.
#pragma once
#include <cuda.h>

namespace afdkit {

// Returns the driver function `name` (ABI of CUDA 12.0), or throws CudaError naming
// it when the driver lacks it or no driver is installed.
void* driver_entry_point(const char* name);

template <class Fn>
Fn driver_fn(const char* name) {
  return reinterpret_cast<Fn>(driver_entry_point(name));
}

// Number of visible CUDA devices; 0 (never an exception) when there is no driver.
int cuda_device_count();

}  // namespace afdkit
