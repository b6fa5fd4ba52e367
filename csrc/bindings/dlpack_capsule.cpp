#include "bindings/dlpack_capsule.h"

#include <cstring>
#include <vector>

#include "common/dlpack.h"
#include "common/errors.h"

namespace afdkit::bindings {
namespace {

constexpr const char* kLegacyName = "dltensor";
constexpr const char* kLegacyUsed = "used_dltensor";
constexpr const char* kVersionedName = "dltensor_versioned";
constexpr const char* kVersionedUsed = "used_dltensor_versioned";

Device device_from_dlpack(const DLDevice& d, const char* op, const char* arg) {
  switch (d.device_type) {
    case kDLCPU: return {DeviceKind::kCPU, 0};
    case kDLCUDA: return {DeviceKind::kCUDA, d.device_id};
    case kDLCUDAHost: return {DeviceKind::kCUDAHost, 0};
    case kDLCUDAManaged: return {DeviceKind::kCUDAManaged, d.device_id};
    default:
      AFDKIT_THROW(ValueError, op, ": argument '", arg, "' lives on DLPack device type ",
                   static_cast<int>(d.device_type), ", which afdkit does not support (cpu or cuda only)");
  }
}

DLDevice device_to_dlpack(const Device& d) {
  switch (d.kind) {
    case DeviceKind::kCPU: return {kDLCPU, 0};
    case DeviceKind::kCUDA: return {kDLCUDA, d.index};
    case DeviceKind::kCUDAHost: return {kDLCUDAHost, 0};
    case DeviceKind::kCUDAManaged: return {kDLCUDAManaged, d.index};
  }
  return {kDLCPU, 0};
}

TensorView view_from_dltensor(const DLTensor& t, bool read_only, const char* op, const char* arg) {
  TensorView v;
  if (!dtype_from_dlpack(t.dtype, &v.dtype))
    AFDKIT_THROW(TypeError, op, ": argument '", arg, "' has element type ", dlpack_dtype_str(t.dtype),
                 ", which afdkit does not support");
  v.device = device_from_dlpack(t.device, op, arg);
  v.data = static_cast<char*>(t.data) + t.byte_offset;
  v.read_only = read_only;
  v.shape.assign(t.shape, t.shape + t.ndim);
  v.strides.resize(t.ndim);
  if (t.strides) {
    std::memcpy(v.strides.data(), t.strides, sizeof(int64_t) * t.ndim);
  } else {  // DLPack allows NULL strides for compact row-major tensors
    int64_t s = 1;
    for (int i = t.ndim - 1; i >= 0; --i) {
      v.strides[i] = s;
      s *= t.shape[i];
    }
  }
  return v;
}

Borrowed borrow_capsule(PyObject* cap, const char* op, const char* arg) {
  Borrowed b;
  if (PyCapsule_IsValid(cap, kVersionedName)) {
    auto* m = static_cast<DLManagedTensorVersioned*>(PyCapsule_GetPointer(cap, kVersionedName));
    if (m->version.major != AFDKIT_DLPACK_MAJOR_VERSION)
      AFDKIT_THROW(TypeError, op, ": argument '", arg, "' uses DLPack ", m->version.major, ".",
                   m->version.minor, "; afdkit understands major version ", AFDKIT_DLPACK_MAJOR_VERSION);
    b.view = view_from_dltensor(m->dl_tensor, (m->flags & AFDKIT_DLPACK_FLAG_READ_ONLY) != 0, op, arg);
    PyCapsule_SetName(cap, kVersionedUsed);  // the consumer owns it now
    b.owner = std::shared_ptr<void>(m, [](void* p) {
      auto* mt = static_cast<DLManagedTensorVersioned*>(p);
      if (mt->deleter) mt->deleter(mt);
    });
    return b;
  }
  if (PyCapsule_IsValid(cap, kLegacyName)) {
    auto* m = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(cap, kLegacyName));
    b.view = view_from_dltensor(m->dl_tensor, false, op, arg);
    PyCapsule_SetName(cap, kLegacyUsed);
    b.owner = std::shared_ptr<void>(m, [](void* p) {
      auto* mt = static_cast<DLManagedTensor*>(p);
      if (mt->deleter) mt->deleter(mt);
    });
    return b;
  }
  AFDKIT_THROW(TypeError, op, ": argument '", arg, "' is a capsule that is not an unconsumed DLPack tensor (name '",
               PyCapsule_GetName(cap) ? PyCapsule_GetName(cap) : "", "')");
}

}  // namespace

Borrowed borrow(py::handle obj, const char* op, const char* arg) {
  if (obj.is_none()) AFDKIT_THROW(TypeError, op, ": argument '", arg, "' must be a tensor, got None");
  if (PyCapsule_CheckExact(obj.ptr())) return borrow_capsule(obj.ptr(), op, arg);
  if (py::hasattr(obj, "__dlpack__")) {
    py::object cap;
    try {
      cap = obj.attr("__dlpack__")(py::arg("max_version") = py::make_tuple(1, 1));
    } catch (py::error_already_set&) {
      cap = obj.attr("__dlpack__")();  // producers that predate DLPack 1.0
    }
    return borrow_capsule(cap.ptr(), op, arg);
  }
  AFDKIT_THROW(TypeError, op, ": argument '", arg, "' must be a DLPack tensor or capsule, got ",
               std::string(py::str(py::type::of(obj).attr("__name__"))));
}

Borrowed borrow_optional(py::handle obj, const char* op, const char* arg) {
  if (obj.is_none()) return Borrowed{};
  return borrow(obj, op, arg);
}

namespace {
// Owns the shape/stride arrays of an exported tensor and the Python object whose
// memory it views. Deleters may run on any thread, so they take the GIL.
struct ExportCtx {
  std::vector<int64_t> shape, strides;
  PyObject* keepalive = nullptr;
};

void release_ctx(ExportCtx* ctx) {
  if (Py_IsInitialized()) {
    py::gil_scoped_acquire gil;
    Py_XDECREF(ctx->keepalive);
  }
  delete ctx;
}

template <class Managed>
void fill(Managed* m, ExportCtx* ctx, const TensorView& v) {
  DLTensor& t = m->dl_tensor;
  t.data = v.data;
  t.device = device_to_dlpack(v.device);
  t.ndim = v.ndim();
  t.dtype = dtype_to_dlpack(v.dtype);
  t.shape = ctx->shape.data();
  t.strides = ctx->strides.data();
  t.byte_offset = 0;
  m->manager_ctx = ctx;
}
}  // namespace

py::capsule export_capsule(const TensorView& view, py::object keepalive, bool versioned) {
  auto* ctx = new ExportCtx{view.shape, view.strides, keepalive.release().ptr()};
  if (versioned) {
    auto* m = new DLManagedTensorVersioned{};
    m->version = {AFDKIT_DLPACK_MAJOR_VERSION, AFDKIT_DLPACK_MINOR_VERSION};
    m->flags = view.read_only ? AFDKIT_DLPACK_FLAG_READ_ONLY : 0;
    fill(m, ctx, view);
    m->deleter = [](DLManagedTensorVersioned* self) {
      release_ctx(static_cast<ExportCtx*>(self->manager_ctx));
      delete self;
    };
    // An unconsumed capsule still owns the tensor when Python collects it.
    return py::capsule(m, kVersionedName, [](PyObject* cap) {
      if (PyCapsule_IsValid(cap, kVersionedName)) {
        auto* mt = static_cast<DLManagedTensorVersioned*>(PyCapsule_GetPointer(cap, kVersionedName));
        mt->deleter(mt);
      }
    });
  }
  auto* m = new DLManagedTensor{};
  fill(m, ctx, view);
  m->deleter = [](DLManagedTensor* self) {
    release_ctx(static_cast<ExportCtx*>(self->manager_ctx));
    delete self;
  };
  return py::capsule(m, kLegacyName, [](PyObject* cap) {
    if (PyCapsule_IsValid(cap, kLegacyName)) {
      auto* mt = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(cap, kLegacyName));
      mt->deleter(mt);
    }
  });
}

}  // namespace afdkit::bindings
