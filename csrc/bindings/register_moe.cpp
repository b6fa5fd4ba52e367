// afdkit._C MoE ops on one GPU: route (scoring + top-k), permute, unpermute.
#include "bindings/dlpack_capsule.h"
#include "bindings/registry.h"
#include "common/device_guard.h"
#include "moe/route.h"

namespace afdkit::bindings {
namespace {

void route(py::handle logits_obj, py::handle weights_obj, py::handle ids_obj, int top_k, const std::string& scoring,
           bool renormalize, std::uintptr_t stream) {
  constexpr const char* op = "afdkit.moe.route";
  Borrowed logits = borrow(logits_obj, op, "router_logits"), w = borrow(weights_obj, op, "weights"),
           ids = borrow(ids_obj, op, "ids");
  check(op, "router_logits", *logits).dtype_in({DType::kFloat32, DType::kBFloat16, DType::kFloat16}).ndim(2)
      .on_cuda().last_dim_contiguous();
  const int64_t tokens = logits->size(0);
  check(op, "weights", *w).dtype(DType::kFloat32).shape({tokens, top_k}).contiguous().writable();
  check(op, "ids", *ids).dtype(DType::kInt32).shape({tokens, top_k}).contiguous().writable();
  check_same_device(op, {{"router_logits", &logits.view}, {"weights", &w.view}, {"ids", &ids.view}});
  if (scoring != "softmax" && scoring != "sigmoid")
    AFDKIT_THROW(ValueError, op, ": scoring must be 'softmax' or 'sigmoid', got '", scoring, "'");
  moe::RouteParams p;
  p.logits = logits->data;
  p.logits_dtype = logits->dtype;
  p.logits_row_stride = logits->stride(0);
  p.tokens = tokens;
  p.num_experts = static_cast<int>(logits->size(1));
  p.top_k = top_k;
  p.scoring = scoring == "softmax" ? moe::Scoring::kSoftmax : moe::Scoring::kSigmoid;
  p.renormalize = renormalize;
  p.weights = w->ptr<float>();
  p.ids = ids->ptr<int32_t>();
  DeviceGuard guard(logits->device);
  py::gil_scoped_release nogil;
  moe::route(p, as_stream(stream));
}

void permute(py::handle x_obj, py::handle ids_obj, int num_experts, py::handle out_obj, py::handle scales_obj,
             py::handle counts_obj, py::handle offsets_obj, py::handle inverse_obj, py::handle cursor_obj,
             std::uintptr_t stream) {
  constexpr const char* op = "afdkit.moe.permute";
  Borrowed x = borrow(x_obj, op, "x"), ids = borrow(ids_obj, op, "topk_ids"), out = borrow(out_obj, op, "out"),
           counts = borrow(counts_obj, op, "expert_counts"), offsets = borrow(offsets_obj, op, "expert_offsets"),
           inverse = borrow(inverse_obj, op, "inverse"), cursor = borrow(cursor_obj, op, "workspace");
  Borrowed scales = borrow_optional(scales_obj, op, "out_scales");
  check(op, "x", *x).dtype_in({DType::kBFloat16, DType::kFloat16, DType::kFloat32}).ndim(2).on_cuda()
      .last_dim_contiguous();
  const int64_t tokens = x->size(0), hidden = x->size(1);
  check(op, "topk_ids", *ids).dtype(DType::kInt32).ndim(2).size(0, tokens, "tokens").contiguous();
  const int64_t top_k = ids->size(1);
  const bool quantize = scales.view.data != nullptr;
  check(op, "out", *out).shape({tokens * top_k, hidden}).contiguous().writable();
  if (quantize) {
    if (hidden % moe::kQuantGroup != 0)
      AFDKIT_THROW(ValueError, op, ": FP8 dispatch needs hidden % 128 == 0, got ", hidden);
    check(op, "out", *out).dtype(DType::kFloat8E4M3FN);
    check(op, "out_scales", *scales).dtype(DType::kFloat32).shape({tokens * top_k, hidden / moe::kQuantGroup})
        .contiguous();
  } else {
    check(op, "out", *out).dtype(x->dtype);
  }
  check(op, "expert_counts", *counts).dtype(DType::kInt32).shape({num_experts}).contiguous();
  check(op, "expert_offsets", *offsets).dtype(DType::kInt32).shape({num_experts + 1}).contiguous();
  check(op, "inverse", *inverse).dtype(DType::kInt32).shape({tokens, top_k}).contiguous();
  check(op, "workspace", *cursor).dtype(DType::kInt32).shape({num_experts}).contiguous();
  check_same_device(op, {{"x", &x.view}, {"topk_ids", &ids.view}, {"out", &out.view}, {"expert_counts", &counts.view},
                         {"expert_offsets", &offsets.view}, {"inverse", &inverse.view}, {"workspace", &cursor.view}});
  moe::PermuteParams p;
  p.x = x->data;
  p.x_dtype = x->dtype;
  p.x_row_stride = x->stride(0);
  p.tokens = tokens;
  p.hidden = hidden;
  p.ids = ids->ptr<int32_t>();
  p.top_k = static_cast<int>(top_k);
  p.num_experts = num_experts;
  p.quantize = quantize;
  p.out = out->data;
  p.out_scales = quantize ? scales->ptr<float>() : nullptr;
  p.expert_counts = counts->ptr<int32_t>();
  p.expert_offsets = offsets->ptr<int32_t>();
  p.inverse = inverse->ptr<int32_t>();
  p.cursor_workspace = cursor->ptr<int32_t>();
  DeviceGuard guard(x->device);
  py::gil_scoped_release nogil;
  moe::permute(p, as_stream(stream));
}

void unpermute(py::handle y_obj, py::handle inverse_obj, py::handle weights_obj, py::handle out_obj,
               std::uintptr_t stream) {
  constexpr const char* op = "afdkit.moe.unpermute";
  Borrowed y = borrow(y_obj, op, "y"), inverse = borrow(inverse_obj, op, "inverse"),
           w = borrow(weights_obj, op, "topk_weights"), out = borrow(out_obj, op, "out");
  check(op, "inverse", *inverse).dtype(DType::kInt32).ndim(2).contiguous().on_cuda();
  const int64_t tokens = inverse->size(0), top_k = inverse->size(1);
  check(op, "y", *y).dtype(DType::kBFloat16).ndim(2).size(0, tokens * top_k, "tokens * top_k")
      .last_dim_contiguous();
  const int64_t hidden = y->size(1);
  check(op, "topk_weights", *w).dtype(DType::kFloat32).shape({tokens, top_k}).contiguous();
  check(op, "out", *out).dtype(DType::kBFloat16).shape({tokens, hidden}).last_dim_contiguous().writable();
  check_same_device(op, {{"y", &y.view}, {"inverse", &inverse.view}, {"topk_weights", &w.view}, {"out", &out.view}});
  moe::UnpermuteParams p;
  p.y = y->data;
  p.y_row_stride = y->stride(0);
  p.inverse = inverse->ptr<int32_t>();
  p.weights = w->ptr<float>();
  p.tokens = tokens;
  p.hidden = hidden;
  p.top_k = static_cast<int>(top_k);
  p.out = out->data;
  p.out_row_stride = out->stride(0);
  DeviceGuard guard(y->device);
  py::gil_scoped_release nogil;
  moe::unpermute(p, as_stream(stream));
}

}  // namespace

void register_moe(py::module_& m) {
  auto moe = m.def_submodule("moe", "MoE routing and expert-major permutation on one GPU");
  moe.def("route", &route, py::arg("router_logits"), py::arg("weights"), py::arg("ids"), py::arg("top_k"),
          py::arg("scoring"), py::arg("renormalize"), py::arg("stream") = 0);
  moe.def("permute", &permute, py::arg("x"), py::arg("topk_ids"), py::arg("num_experts"), py::arg("out"),
          py::arg("out_scales"), py::arg("expert_counts"), py::arg("expert_offsets"), py::arg("inverse"),
          py::arg("workspace"), py::arg("stream") = 0);
  moe.def("unpermute", &unpermute, py::arg("y"), py::arg("inverse"), py::arg("topk_weights"), py::arg("out"),
          py::arg("stream") = 0);
}

}  // namespace afdkit::bindings
