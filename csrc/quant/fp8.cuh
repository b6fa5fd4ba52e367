// Device helpers of the FP8 e4m3 convention (see quant/quantize.h), shared by every
// kernel that quantizes: the KV append, MoE permute/dispatch and quantize_fp8.
#pragma once
#include <cuda_fp8.h>

#include "quant/quantize.h"

namespace afdkit::quant {

// Saturating e4m3: +-inf -> +-448 and NaN -> NaN, which equals torch's
// clamp(-448, 448) followed by the cast for every input.
__device__ __forceinline__ __nv_fp8_storage_t encode_e4m3(float x, float scale) {
  return __nv_cvt_float_to_fp8(__fdiv_rn(x, scale), __NV_SATFINITE, __NV_E4M3);
}

// NaN-propagating: a NaN amax must give a NaN scale, as torch.clamp does.
__device__ __forceinline__ float scale_from_amax(float amax) {
  return __fdiv_rn(amax < kMinAmax ? kMinAmax : amax, kE4M3Max);
}

}  // namespace afdkit::quant
