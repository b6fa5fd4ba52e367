// decode(): argument checks, dispatch over the KV dtype to the sm90a kernel
// instantiations, then the split-KV combine.
#include "common/cuda_check.h"
#include "mfa/launch.h"
#include "mfa/launch_checks.h"
#include "mfa/sm90_profile.cuh"

namespace afdkit::mfa {
namespace sm90 {
template <KvDtype kKv>
void launch_decode_sm90(const DecodeParams& p, const PlanBuffers& pb, cudaStream_t stream);
}
namespace sm90::prof {
namespace {
unsigned long long* g_buffer = nullptr;  // read only by -DAFDKIT_MFA_PROFILE builds
}
void set_buffer(unsigned long long* buf) { g_buffer = buf; }
unsigned long long* buffer() { return g_buffer; }
}  // namespace sm90::prof

namespace detail {
void launch_combine(const DecodeParams& p, const PlanBuffers& pb, cudaStream_t stream);
}

void decode(const DecodeParams& p, const PlanBuffers& pb, cudaStream_t stream) {
  detail::check_decode(p, "mfa.decode");
  if (p.batch == 0) return;
  AFDKIT_CHECK(pb.num_sm_parts >= 1 && pb.part_meta && pb.batch_meta,
               "mfa.decode: plan buffers missing (call plan() with the same seq_lens first)");
  detail::check_plan_meta_aligned(pb, "mfa.decode");
  AFDKIT_CHECK(pb.num_sm_parts == 1 || (pb.o_partial && pb.lse_partial),
               "mfa.decode: o_partial/lse_partial are required when num_sm_parts > 1");
  if (p.kv_dtype == KvDtype::kFp8E4M3) sm90::launch_decode_sm90<KvDtype::kFp8E4M3>(p, pb, stream);
  else sm90::launch_decode_sm90<KvDtype::kBf16>(p, pb, stream);
  detail::launch_combine(p, pb, stream);
}

}  // namespace afdkit::mfa
