// Makes a tensor's GPU the current device for the duration of an op, then
// restores the caller's: kernels must launch where their data lives.
#pragma once
#include <cuda_runtime_api.h>

#include "common/cuda_check.h"
#include "common/tensor_view.h"

namespace afdkit {

class DeviceGuard {
 public:
  explicit DeviceGuard(const Device& d) {
    if (!d.is_cuda()) return;
    AFDKIT_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != d.index) {
      AFDKIT_CUDA_CHECK(cudaSetDevice(d.index));
      switched_ = true;
    }
  }
  ~DeviceGuard() {
    if (switched_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool switched_ = false;
};

}  // namespace afdkit
