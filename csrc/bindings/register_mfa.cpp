// afdkit._C.mfa: FP8 MFA decode (sm90 and the SIMT oracle), its split-KV plan, and
// the KV append. Python (afdkit.mfa) validates shapes and indices first; the checks
// here keep direct callers of _C from launching on mismatched tensors.
#include <cuda_runtime_api.h>

#include "bindings/dlpack_capsule.h"
#include "bindings/registry.h"
#include "common/cuda_check.h"
#include "common/device_guard.h"
#include "mfa/launch.h"

namespace afdkit::bindings {
namespace {

constexpr const char* kDecode = "afdkit.mfa.decode";
constexpr const char* kAppend = "afdkit.mfa.append_kv";

mfa::KvDtype kv_dtype_of(const TensorView& cache, const char* op) {
  check(op, "k_cache", cache).dtype_in({DType::kFloat8E4M3FN, DType::kBFloat16});
  return cache.dtype == DType::kBFloat16 ? mfa::KvDtype::kBf16 : mfa::KvDtype::kFp8E4M3;
}

// Per-tensor (one value) or per-token (cache-shaped [pages, page_size, kv_heads]).
mfa::ScaleMode scale_mode_of(const Borrowed& scale, const TensorView& cache, const char* op, const char* arg) {
  if (cache.dtype == DType::kBFloat16) return mfa::ScaleMode::kNone;
  if (!scale.view.data) AFDKIT_THROW(ValueError, op, ": argument '", arg, "' is required for a float8_e4m3fn cache");
  check(op, arg, *scale).dtype(DType::kFloat32).on(cache.device);
  if (scale->numel() == 1) return mfa::ScaleMode::kPerTensor;
  check(op, arg, *scale).shape({cache.size(0), cache.size(1), cache.size(2)}).contiguous();
  return mfa::ScaleMode::kPerToken;
}

py::dict plan_sizes(int batch, int q_len, int num_q_heads, int num_kv_heads, int device) {
  int sms = 0;
  AFDKIT_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const mfa::PlanSizes s = mfa::plan_sizes(batch, q_len, num_q_heads, num_kv_heads, sms);
  py::dict d;
  d["num_sm_parts"] = s.num_sm_parts;
  d["part_meta_ints"] = s.part_meta_ints;
  d["batch_meta_ints"] = s.batch_meta_ints;
  d["num_slots"] = s.num_slots;
  d["o_partial_floats"] = s.o_partial_floats;
  d["lse_partial_floats"] = s.lse_partial_floats;
  return d;
}

struct PlanArgs {
  Borrowed part_meta, batch_meta, o_partial, lse_partial;
  mfa::PlanBuffers buffers() const {
    return {part_meta->ptr<int32_t>(), batch_meta->ptr<int32_t>(), 0, o_partial->ptr<float>(),
            lse_partial->ptr<float>()};
  }
};

PlanArgs borrow_plan(py::handle pm, py::handle bm, py::handle op_, py::handle lp, const char* op) {
  PlanArgs a{borrow(pm, op, "part_meta"), borrow(bm, op, "batch_meta"), borrow(op_, op, "o_partial"),
             borrow(lp, op, "lse_partial")};
  check(op, "part_meta", *a.part_meta).dtype(DType::kInt32).contiguous().on_cuda();
  check(op, "batch_meta", *a.batch_meta).dtype(DType::kInt32).contiguous().on(a.part_meta->device);
  check(op, "o_partial", *a.o_partial).dtype(DType::kFloat32).contiguous().on(a.part_meta->device);
  check(op, "lse_partial", *a.lse_partial).dtype(DType::kFloat32).contiguous().on(a.part_meta->device);
  return a;
}

void plan(py::handle seq_lens_obj, py::handle pm, py::handle bm, py::handle op_, py::handle lp, int num_sm_parts,
          std::uintptr_t stream) {
  constexpr const char* op = "afdkit.mfa.plan";
  Borrowed lens = borrow(seq_lens_obj, op, "seq_lens");
  check(op, "seq_lens", *lens).dtype(DType::kInt32).ndim(1).contiguous().on_cuda();
  PlanArgs a = borrow_plan(pm, bm, op_, lp, op);
  mfa::PlanBuffers b = a.buffers();
  b.num_sm_parts = num_sm_parts;
  DeviceGuard guard(lens->device);
  py::gil_scoped_release nogil;
  mfa::plan(lens->ptr<int32_t>(), static_cast<int>(lens->size(0)), b, as_stream(stream));
}

mfa::DecodeParams decode_params(const Borrowed& q, const Borrowed& kc, const Borrowed& vc, const Borrowed& ks,
                                const Borrowed& vs, const Borrowed& table, const Borrowed& lens, float scale,
                                const Borrowed& out, const Borrowed& lse) {
  check(kDecode, "q", *q).dtype(DType::kBFloat16).ndim(4).last_dim_contiguous().on_cuda();
  check(kDecode, "k_cache", *kc).ndim(4).contiguous().on(q->device);
  check(kDecode, "v_cache", *vc).ndim(4).contiguous().on(q->device).shape({kc->size(0), kc->size(1), kc->size(2),
                                                                           kc->size(3)});
  if (vc->dtype != kc->dtype) AFDKIT_THROW(TypeError, kDecode, ": 'k_cache' and 'v_cache' must have one dtype");
  check(kDecode, "block_table", *table).dtype(DType::kInt32).ndim(2).last_dim_contiguous().on(q->device);
  check(kDecode, "seq_lens", *lens).dtype(DType::kInt32).shape({q->size(0)}).contiguous().on(q->device);
  check(kDecode, "out", *out).dtype(DType::kBFloat16).shape({q->size(0), q->size(1), q->size(2), q->size(3)})
      .last_dim_contiguous().on(q->device).writable();
  mfa::DecodeParams p;
  p.kv_dtype = kv_dtype_of(*kc, kDecode);
  p.scale_mode = scale_mode_of(ks, *kc, kDecode, "k_scale");
  if (scale_mode_of(vs, *kc, kDecode, "v_scale") != p.scale_mode)
    AFDKIT_THROW(ValueError, kDecode, ": 'k_scale' and 'v_scale' must both be per-tensor or both per-token");
  p.q = q->data;
  p.q_stride_b = q->stride(0), p.q_stride_t = q->stride(1), p.q_stride_h = q->stride(2);
  p.k_cache = kc->data, p.v_cache = vc->data;
  p.kv_stride_page = kc->stride(0), p.kv_stride_token = kc->stride(1), p.kv_stride_head = kc->stride(2);
  p.k_scale = ks.view.data ? ks->ptr<float>() : nullptr;
  p.v_scale = vs.view.data ? vs->ptr<float>() : nullptr;
  p.block_table = table->ptr<int32_t>(), p.block_table_stride = table->stride(0);
  p.max_pages_per_seq = static_cast<int>(table->size(1));
  p.seq_lens = lens->ptr<int32_t>();
  p.batch = static_cast<int>(q->size(0)), p.q_len = static_cast<int>(q->size(1));
  p.num_q_heads = static_cast<int>(q->size(2)), p.num_kv_heads = static_cast<int>(kc->size(2));
  p.page_size = static_cast<int>(kc->size(1)), p.num_pages = static_cast<int>(kc->size(0));
  p.softmax_scale = scale;
  p.out = out->data;
  p.out_stride_b = out->stride(0), p.out_stride_t = out->stride(1), p.out_stride_h = out->stride(2);
  if (lse.view.data) {
    check(kDecode, "lse", *lse).dtype(DType::kFloat32).shape({q->size(0), q->size(1), q->size(2)}).contiguous()
        .on(q->device).writable();
    p.lse = lse->ptr<float>();
  }
  return p;
}

void decode(py::handle q_obj, py::handle kc_obj, py::handle vc_obj, py::handle ks_obj, py::handle vs_obj,
            py::handle table_obj, py::handle lens_obj, float softmax_scale, py::handle out_obj, py::handle lse_obj,
            py::handle pm, py::handle bm, py::handle op_, py::handle lp, int num_sm_parts, bool simt,
            std::uintptr_t stream) {
  Borrowed q = borrow(q_obj, kDecode, "q"), kc = borrow(kc_obj, kDecode, "k_cache"),
           vc = borrow(vc_obj, kDecode, "v_cache"), ks = borrow_optional(ks_obj, kDecode, "k_scale"),
           vs = borrow_optional(vs_obj, kDecode, "v_scale"), table = borrow(table_obj, kDecode, "block_table"),
           lens = borrow(lens_obj, kDecode, "seq_lens"), out = borrow(out_obj, kDecode, "out"),
           lse = borrow_optional(lse_obj, kDecode, "lse");
  const mfa::DecodeParams p = decode_params(q, kc, vc, ks, vs, table, lens, softmax_scale, out, lse);
  DeviceGuard guard(q->device);
  if (simt) {
    py::gil_scoped_release nogil;
    mfa::decode_simt(p, as_stream(stream));
    return;
  }
  PlanArgs a = borrow_plan(pm, bm, op_, lp, kDecode);
  mfa::PlanBuffers b = a.buffers();
  b.num_sm_parts = num_sm_parts;
  py::gil_scoped_release nogil;
  mfa::decode(p, b, as_stream(stream));
}

void append_kv(py::handle k_obj, py::handle v_obj, py::handle kc_obj, py::handle vc_obj, py::handle slots_obj,
               py::handle ks_obj, py::handle vs_obj, std::uintptr_t stream) {
  Borrowed k = borrow(k_obj, kAppend, "k"), v = borrow(v_obj, kAppend, "v"), kc = borrow(kc_obj, kAppend, "k_cache"),
           vc = borrow(vc_obj, kAppend, "v_cache"), slots = borrow(slots_obj, kAppend, "slot_mapping"),
           ks = borrow_optional(ks_obj, kAppend, "k_scale"), vs = borrow_optional(vs_obj, kAppend, "v_scale");
  check(kAppend, "k", *k).dtype(DType::kBFloat16).ndim(3).last_dim_contiguous().on_cuda();
  check(kAppend, "v", *v).dtype(DType::kBFloat16).shape({k->size(0), k->size(1), k->size(2)}).last_dim_contiguous()
      .on(k->device);
  check(kAppend, "k_cache", *kc).ndim(4).contiguous().on(k->device).writable();
  check(kAppend, "v_cache", *vc).ndim(4).contiguous().on(k->device).writable()
      .shape({kc->size(0), kc->size(1), kc->size(2), kc->size(3)});
  check(kAppend, "slot_mapping", *slots).dtype(DType::kInt64).shape({k->size(0)}).contiguous().on(k->device);
  mfa::AppendKvParams p;
  p.kv_dtype = kv_dtype_of(*kc, kAppend);
  p.scale_mode = scale_mode_of(ks, *kc, kAppend, "k_scale");
  if (scale_mode_of(vs, *kc, kAppend, "v_scale") != p.scale_mode)
    AFDKIT_THROW(ValueError, kAppend, ": 'k_scale' and 'v_scale' must both be per-tensor or both per-token");
  p.k = k->data, p.v = v->data;
  p.k_stride_t = k->stride(0), p.k_stride_h = k->stride(1), p.v_stride_t = v->stride(0), p.v_stride_h = v->stride(1);
  p.num_tokens = static_cast<int>(k->size(0)), p.num_kv_heads = static_cast<int>(k->size(1));
  p.slot_mapping = slots->ptr<int64_t>();
  p.k_cache = kc->data, p.v_cache = vc->data;
  p.kv_stride_page = kc->stride(0), p.kv_stride_token = kc->stride(1), p.kv_stride_head = kc->stride(2);
  p.page_size = static_cast<int>(kc->size(1)), p.num_pages = static_cast<int>(kc->size(0));
  p.k_scale = ks.view.data ? ks->ptr<float>() : nullptr;
  p.v_scale = vs.view.data ? vs->ptr<float>() : nullptr;
  DeviceGuard guard(k->device);
  py::gil_scoped_release nogil;
  mfa::append_kv(p, as_stream(stream));
}

}  // namespace

void register_mfa(py::module_& m) {
  auto mfa = m.def_submodule("mfa", "FP8 MFA decode attention over a paged KV cache (sm_90a)");
  mfa.def("plan_sizes", &plan_sizes, py::arg("batch"), py::arg("q_len"), py::arg("num_q_heads"),
          py::arg("num_kv_heads"), py::arg("device"));
  mfa.def("plan", &plan, py::arg("seq_lens"), py::arg("part_meta"), py::arg("batch_meta"), py::arg("o_partial"),
          py::arg("lse_partial"), py::arg("num_sm_parts"), py::arg("stream") = 0);
  mfa.def("decode", &decode, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("k_scale"),
          py::arg("v_scale"), py::arg("block_table"), py::arg("seq_lens"), py::arg("softmax_scale"), py::arg("out"),
          py::arg("lse"), py::arg("part_meta"), py::arg("batch_meta"), py::arg("o_partial"), py::arg("lse_partial"),
          py::arg("num_sm_parts"), py::arg("simt") = false, py::arg("stream") = 0);
  mfa.def("append_kv", &append_kv, py::arg("k"), py::arg("v"), py::arg("k_cache"), py::arg("v_cache"),
          py::arg("slot_mapping"), py::arg("k_scale"), py::arg("v_scale"), py::arg("stream") = 0);
}

}  // namespace afdkit::bindings
