// afdkit._C.quantize_fp8: FP8 e4m3 quantization on the GPU (CPU tensors are
// handled by the Python reference, never here).
#include "bindings/dlpack_capsule.h"
#include "bindings/registry.h"
#include "common/device_guard.h"
#include "quant/quantize.h"

namespace afdkit::bindings {
namespace {

constexpr const char* kOp = "afdkit.quantize_fp8";

quant::Granularity parse_granularity(const std::string& g) {
  if (g == "tensor") return quant::Granularity::kTensor;
  if (g == "token") return quant::Granularity::kToken;
  if (g == "channel128") return quant::Granularity::kChannel128;
  AFDKIT_THROW(ValueError, kOp, ": granularity must be 'tensor', 'token' or 'channel128', got '", g, "'");
}

// x [rows, cols] -> q [rows, cols] e4m3 and scale (shape by granularity).
void quantize_fp8(py::handle x_obj, py::handle q_obj, py::handle scale_obj, const std::string& granularity,
                  bool static_scale, py::handle workspace_obj, std::uintptr_t stream) {
  const auto g = parse_granularity(granularity);
  Borrowed x = borrow(x_obj, kOp, "x"), q = borrow(q_obj, kOp, "out"), s = borrow(scale_obj, kOp, "scale");
  Borrowed ws = borrow_optional(workspace_obj, kOp, "workspace");
  check(kOp, "x", *x).dtype_in({DType::kBFloat16, DType::kFloat16, DType::kFloat32}).ndim(2).on_cuda()
      .last_dim_contiguous();
  const int64_t rows = x->size(0), cols = x->size(1);
  check(kOp, "out", *q).dtype(DType::kFloat8E4M3FN).shape({rows, cols}).last_dim_contiguous().writable();
  check(kOp, "scale", *s).dtype(DType::kFloat32);
  switch (g) {
    case quant::Granularity::kTensor: check(kOp, "scale", *s).shape({1}); break;
    case quant::Granularity::kToken: check(kOp, "scale", *s).shape({rows}).contiguous(); break;
    case quant::Granularity::kChannel128:
      if (cols % quant::kChannelGroup != 0)
        AFDKIT_THROW(ValueError, kOp, ": per-128-channel scales need x.shape[1] % 128 == 0, got ", cols);
      check(kOp, "scale", *s).shape({rows, cols / quant::kChannelGroup}).last_dim_contiguous();
      break;
  }
  if (static_scale && g != quant::Granularity::kTensor)
    AFDKIT_THROW(ValueError, kOp, ": a given (static) scale is only supported for granularity 'tensor'");
  if (g == quant::Granularity::kTensor && !static_scale) {
    if (!ws.view.data) AFDKIT_THROW(ValueError, kOp, ": dynamic per-tensor scaling needs a 'workspace' tensor");
    check(kOp, "workspace", *ws).dtype(DType::kFloat32).shape({1});
  }
  check_same_device(kOp, {{"x", &x.view}, {"out", &q.view}, {"scale", &s.view}});
  if (ws.view.data) check_same_device(kOp, {{"x", &x.view}, {"workspace", &ws.view}});

  quant::QuantizeParams p;
  p.x = x->data;
  p.x_dtype = x->dtype;
  p.rows = rows;
  p.cols = cols;
  p.x_row_stride = x->stride(0);
  p.q = q->data;
  p.q_row_stride = q->stride(0);
  p.scale = s->ptr<float>();
  p.scale_row_stride = g == quant::Granularity::kChannel128 ? s->stride(0) : 1;
  p.granularity = g;
  p.static_scale = static_scale;
  p.amax_workspace = ws.view.data ? ws->ptr<float>() : nullptr;
  DeviceGuard guard(x->device);
  py::gil_scoped_release nogil;
  quant::quantize_fp8(p, as_stream(stream));
}

}  // namespace

void register_quant(py::module_& m) {
  m.def("quantize_fp8", &quantize_fp8, py::arg("x"), py::arg("out"), py::arg("scale"), py::arg("granularity"),
        py::arg("static_scale") = false, py::arg("workspace") = py::none(), py::arg("stream") = 0,
        "FP8 e4m3 quantization of a CUDA tensor x [rows, cols] into out, writing scales "
        "(granularity 'tensor' | 'token' | 'channel128'); stream-ordered on `stream`.");
}

}  // namespace afdkit::bindings
