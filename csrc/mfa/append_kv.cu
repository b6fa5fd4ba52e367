// append_kv: new K/V rows (bf16) into their paged cache slots. One warp per
// (token, kv head, K-or-V) row of 256 values; lane l owns dims 8l..8l+7 (one
// 16-byte load). fp8 caches quantize with the convention of quant/quantize.h,
// bit for bit the same as torch's (x.float() / scale).clamp(-448, 448).to(e4m3fn).
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include "common/cuda_check.h"
#include "mfa/common.cuh"
#include "mfa/launch_checks.h"

namespace afdkit::mfa {
namespace {

// Saturating RNE e4m3 of an IEEE quotient; NaN stays NaN, +-inf saturates to +-448,
// as clamp(-448, 448) followed by the cast does.
__device__ __forceinline__ uint8_t encode_e4m3(float x, float scale) {
  return __nv_cvt_float_to_fp8(__fdiv_rn(x, scale), __NV_SATFINITE, __NV_E4M3);
}

__global__ void append_kv_kernel(AppendKvParams p) {
  const int lane = threadIdx.x % 32;
  const int64_t task = static_cast<int64_t>(blockIdx.x) * cfg::kAppendWarps + threadIdx.x / 32;
  const int64_t rows = static_cast<int64_t>(p.num_tokens) * p.num_kv_heads;
  if (task >= 2 * rows) return;
  const bool is_v = task >= rows;
  const int64_t r = is_v ? task - rows : task;
  const int tok = static_cast<int>(r / p.num_kv_heads), head = static_cast<int>(r % p.num_kv_heads);
  const int64_t slot = p.slot_mapping[tok];
  if (slot < 0) return;
  const int page = static_cast<int>(slot / p.page_size), row = static_cast<int>(slot % p.page_size);

  const auto* src = static_cast<const __nv_bfloat16*>(is_v ? p.v : p.k) +
                    tok * (is_v ? p.v_stride_t : p.k_stride_t) + head * (is_v ? p.v_stride_h : p.k_stride_h) +
                    lane * 8;
  const int64_t dst_off = page * p.kv_stride_page + row * p.kv_stride_token + head * p.kv_stride_head + lane * 8;
  const uint4 raw = *reinterpret_cast<const uint4*>(src);

  if (p.kv_dtype == KvDtype::kBf16) {
    *reinterpret_cast<uint4*>(static_cast<__nv_bfloat16*>(is_v ? p.v_cache : p.k_cache) + dst_off) = raw;
    return;
  }
  const auto* xb = reinterpret_cast<const __nv_bfloat16*>(&raw);
  float x[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) x[e] = __bfloat162float(xb[e]);
  float* scale_ptr = is_v ? p.v_scale : p.k_scale;
  float scale;
  if (p.scale_mode == ScaleMode::kPerToken) {
    float amax = 0.f;
    bool nan = false;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      nan |= isnan(x[e]);
      amax = fmaxf(amax, fabsf(x[e]));
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
    // torch's amax/clamp propagate NaN where fmaxf would drop it.
    if (__any_sync(0xffffffffu, nan)) amax = __int_as_float(0x7fc00000);
    scale = __fdiv_rn(amax < cfg::kMinAmax ? cfg::kMinAmax : amax, cfg::kE4M3Max);
    if (lane == 0) scale_ptr[scale_index(page, row, head, p.page_size, p.num_kv_heads)] = scale;
  } else {
    scale = *scale_ptr;
  }
  uint2 codes;
  auto* c = reinterpret_cast<uint8_t*>(&codes);
#pragma unroll
  for (int e = 0; e < 8; ++e) c[e] = encode_e4m3(x[e], scale);
  *reinterpret_cast<uint2*>(static_cast<uint8_t*>(is_v ? p.v_cache : p.k_cache) + dst_off) = codes;
}

}  // namespace

void append_kv(const AppendKvParams& p, cudaStream_t stream) {
  const char* op = "mfa.append_kv";
  AFDKIT_CHECK(p.num_tokens >= 0 && p.num_kv_heads >= 1, op, ": bad num_tokens/num_kv_heads");
  AFDKIT_CHECK(p.page_size == 16 || p.page_size == 32 || p.page_size == 64, op,
               ": page_size must be 16, 32 or 64, got ", p.page_size);
  const bool fp8 = p.kv_dtype == KvDtype::kFp8E4M3;
  AFDKIT_CHECK(fp8 == (p.scale_mode != ScaleMode::kNone), op,
               ": scale_mode must be kNone exactly for a bf16 cache");
  AFDKIT_CHECK(!fp8 || (p.k_scale && p.v_scale), op, ": fp8 cache needs k_scale and v_scale");
  if (p.num_tokens == 0) return;
  AFDKIT_CHECK(p.k && p.v && p.slot_mapping && p.k_cache && p.v_cache, op, ": null device pointer");
  const int eb = detail::kv_bytes(p.kv_dtype);
  AFDKIT_CHECK(detail::aligned16(p.k) && detail::aligned16(p.v) && p.k_stride_t % 8 == 0 &&
                   p.k_stride_h % 8 == 0 && p.v_stride_t % 8 == 0 && p.v_stride_h % 8 == 0,
               op, ": k, v and their strides must be 16-byte aligned");
  AFDKIT_CHECK(reinterpret_cast<uintptr_t>(p.k_cache) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(p.v_cache) % 16 == 0 && (p.kv_stride_page * eb) % 16 == 0 &&
                   (p.kv_stride_token * eb) % 16 == 0 && (p.kv_stride_head * eb) % 16 == 0,
               op, ": caches and their strides must be 16-byte aligned");
  const int64_t warps = 2LL * p.num_tokens * p.num_kv_heads;
  const int64_t blocks = (warps + cfg::kAppendWarps - 1) / cfg::kAppendWarps;
  AFDKIT_CHECK(blocks <= 0x7fffffffLL, op, ": too many tokens");
  append_kv_kernel<<<static_cast<unsigned>(blocks), cfg::kAppendWarps * 32, 0, stream>>>(p);
  AFDKIT_CHECK_LAUNCH();
}

}  // namespace afdkit::mfa
