// One explicit instantiation per translation unit keeps nvcc jobs small and parallel.
#include "mfa/sm90_kernel.cuh"

namespace afdkit::mfa::sm90 {
template void launch_decode_sm90<KvDtype::kBf16>(const DecodeParams&, const PlanBuffers&, cudaStream_t);
}  // namespace afdkit::mfa::sm90
