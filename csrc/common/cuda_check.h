// CUDA error checking that raises afdkit::CudaError with the failing call and
// location instead of aborting the process.
#pragma once
#include <cuda_runtime_api.h>

#include "common/errors.h"

#define AFDKIT_CUDA_CHECK(expr)                                                      \
  do {                                                                               \
    cudaError_t afdkit_err_ = (expr);                                                \
    if (afdkit_err_ != cudaSuccess) {                                                \
      AFDKIT_THROW(CudaError, #expr, " failed at ", __FILE__, ":", __LINE__, ": ",   \
                   cudaGetErrorName(afdkit_err_), " (", cudaGetErrorString(afdkit_err_), ")"); \
    }                                                                                \
  } while (0)

// After a kernel launch: a bad configuration shows up here, before the next sync.
#define AFDKIT_CHECK_LAUNCH() AFDKIT_CUDA_CHECK(cudaGetLastError())
