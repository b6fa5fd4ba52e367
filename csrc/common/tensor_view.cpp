#include "common/tensor_view.h"

#include "common/errors.h"

namespace afdkit {

std::string Device::str() const {
  switch (kind) {
    case DeviceKind::kCPU: return "cpu";
    case DeviceKind::kCUDA: return str_cat("cuda:", index);
    case DeviceKind::kCUDAHost: return "cuda_host";
    case DeviceKind::kCUDAManaged: return str_cat("cuda_managed:", index);
  }
  return "unknown";
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += shape[i] == kAny ? std::string("*") : std::to_string(shape[i]);
  }
  return s + "]";
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

bool TensorView::is_contiguous() const {
  int64_t expected = 1;
  for (int i = ndim() - 1; i >= 0; --i) {
    // Strides of size-1 dimensions carry no meaning (torch gives them freely).
    if (shape[i] != 1 && strides[i] != expected) return false;
    expected *= shape[i];
  }
  return true;
}

std::string TensorView::describe() const {
  return str_cat(dtype_name(dtype), shape_str(shape), " on ", device.str());
}

std::string ArgCheck::prefix() const { return str_cat(op_, ": argument '", arg_, "' "); }

const ArgCheck& ArgCheck::dtype(DType expected) const {
  if (t_.dtype != expected)
    AFDKIT_THROW(TypeError, prefix(), "must have dtype ", dtype_name(expected), ", got ",
                 dtype_name(t_.dtype), " (", t_.describe(), ")");
  return *this;
}

const ArgCheck& ArgCheck::dtype_in(std::initializer_list<DType> allowed) const {
  std::string names;
  for (DType d : allowed) {
    if (d == t_.dtype) return *this;
    names += names.empty() ? "" : ", ";
    names += dtype_name(d);
  }
  AFDKIT_THROW(TypeError, prefix(), "must have dtype one of (", names, "), got ", dtype_name(t_.dtype),
               " (", t_.describe(), ")");
}

const ArgCheck& ArgCheck::ndim(int expected) const {
  if (t_.ndim() != expected)
    AFDKIT_THROW(ValueError, prefix(), "must have ", expected, " dimensions, got ", t_.ndim(), " (",
                 t_.describe(), ")");
  return *this;
}

const ArgCheck& ArgCheck::shape(std::initializer_list<int64_t> expected) const {
  std::vector<int64_t> exp(expected);
  bool ok = exp.size() == t_.shape.size();
  for (size_t i = 0; ok && i < exp.size(); ++i) ok = exp[i] == kAny || exp[i] == t_.shape[i];
  if (!ok)
    AFDKIT_THROW(ValueError, prefix(), "must have shape ", shape_str(exp), ", got ", shape_str(t_.shape),
                 " (", t_.describe(), ")");
  return *this;
}

const ArgCheck& ArgCheck::size(int dim, int64_t expected, const char* what) const {
  if (t_.size(dim) != expected)
    AFDKIT_THROW(ValueError, prefix(), "must have size ", expected, " in dimension ", dim,
                 what ? str_cat(" (", what, ")") : std::string(), ", got ", t_.size(dim), " (",
                 t_.describe(), ")");
  return *this;
}

const ArgCheck& ArgCheck::contiguous() const {
  if (!t_.is_contiguous())
    AFDKIT_THROW(ValueError, prefix(), "must be contiguous, got strides ", shape_str(t_.strides),
                 " for shape ", shape_str(t_.shape), " (call .contiguous() first)");
  return *this;
}

const ArgCheck& ArgCheck::last_dim_contiguous() const {
  if (t_.ndim() > 0 && t_.size(-1) > 1 && t_.stride(-1) != 1)
    AFDKIT_THROW(ValueError, prefix(), "must have a contiguous last dimension (stride 1), got strides ",
                 shape_str(t_.strides), " for shape ", shape_str(t_.shape));
  return *this;
}

const ArgCheck& ArgCheck::on(const Device& expected) const {
  if (t_.device != expected)
    AFDKIT_THROW(ValueError, prefix(), "must be on ", expected.str(), ", got ", t_.device.str(), " (",
                 t_.describe(), ")");
  return *this;
}

const ArgCheck& ArgCheck::on_cuda() const {
  if (!t_.device.is_cuda())
    AFDKIT_THROW(ValueError, prefix(), "must be a CUDA tensor, got one on ", t_.device.str(), " (",
                 t_.describe(), ")");
  return *this;
}

const ArgCheck& ArgCheck::writable() const {
  if (t_.read_only)
    AFDKIT_THROW(ValueError, prefix(), "is an output but was exported read-only (", t_.describe(), ")");
  return *this;
}

void check_same_device(const char* op, std::initializer_list<std::pair<const char*, const TensorView*>> args) {
  if (args.size() == 0) return;
  const auto& first = *args.begin();
  for (const auto& a : args) {
    if (a.second->device != first.second->device)
      AFDKIT_THROW(ValueError, op, ": all tensors must be on one device, but '", first.first, "' is on ",
                   first.second->device.str(), " and '", a.first, "' is on ", a.second->device.str());
  }
}

}  // namespace afdkit
