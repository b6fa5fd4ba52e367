// build_info() and the DLPack test hooks.
#include <cuda_runtime_api.h>
#include <pybind11/stl.h>

#include "bindings/dlpack_capsule.h"
#include "bindings/registry.h"
#include "build_config.h"
#include "common/driver.h"
#include "common/errors.h"
#include "mesh/ucx_info.h"

namespace afdkit::bindings {
namespace {

py::dict build_info() {
  py::dict d;
  d["version"] = AFDKIT_VERSION;
  d["git_sha"] = AFDKIT_GIT_SHA;
  d["cuda_arch"] = AFDKIT_CUDA_ARCH;
  d["nvcc_version"] = AFDKIT_NVCC_VERSION;
  d["build_type"] = AFDKIT_BUILD_TYPE;
  d["cxx_compiler"] = AFDKIT_CXX_COMPILER;
  int runtime = 0, driver = 0;
  cudaRuntimeGetVersion(&runtime);
  if (cudaDriverGetVersion(&driver) != cudaSuccess) driver = 0;
  cudaGetLastError();
  d["cuda_runtime_version"] = runtime;
  d["cuda_driver_version"] = driver;  // 0: no NVIDIA driver on this host
  d["cuda_device_count"] = cuda_device_count();
  py::dict ucx;
  ucx["build_version"] = AFDKIT_UCX_BUILD_VERSION;
  ucx["runtime_version"] = mesh::ucx_runtime_version();
  ucx["library"] = mesh::ucx_library_path();
  // Report, do not raise: this is what one runs to diagnose a wrong UCX. The transport
  // query uses UCT structs of the build's version, so it is skipped for an older runtime.
  try {
    mesh::check_ucx_runtime();
    ucx["compatible"] = true;
    ucx["transports"] = mesh::ucx_transports();
  } catch (const std::exception& e) {
    ucx["compatible"] = false;
    ucx["error"] = std::string(e.what());
    ucx["transports"] = py::list();
  }
  d["ucx"] = ucx;
  return d;
}

py::dict describe(py::handle obj) {
  Borrowed b = borrow(obj, "afdkit._C._testing.describe", "tensor");
  py::dict d;
  d["dtype"] = dtype_name(b->dtype);
  d["dlpack_code"] = static_cast<int>(dtype_to_dlpack(b->dtype).code);
  d["dlpack_bits"] = static_cast<int>(dtype_to_dlpack(b->dtype).bits);
  d["shape"] = b->shape;
  d["strides"] = b->strides;
  d["device"] = b->device.str();
  d["read_only"] = b->read_only;
  d["data_ptr"] = reinterpret_cast<std::uintptr_t>(b->data);
  return d;
}

// Consume a producer's tensor and hand the same memory back out as a new capsule:
// exercises both directions of the boundary (torch -> afdkit -> torch).
py::capsule reexport(py::handle obj, bool versioned) {
  Borrowed b = borrow(obj, "afdkit._C._testing.reexport", "tensor");
  // The new capsule keeps the borrowed producer tensor alive through a Python
  // object that owns the shared_ptr.
  auto holder = py::capsule(new std::shared_ptr<void>(b.owner),
                            [](void* p) { delete static_cast<std::shared_ptr<void>*>(p); });
  return export_capsule(b.view, holder, versioned);
}

// Runs the standard argument checks so their refusal messages can be tested
// without a GPU kernel behind them.
void check_arg(py::handle obj, const std::string& op, const std::string& arg, py::object dtype,
               py::object shape, py::object device, bool contiguous) {
  Borrowed b = borrow(obj, op.c_str(), arg.c_str());
  ArgCheck c = check(op.c_str(), arg.c_str(), b.view);
  if (!dtype.is_none()) {
    const std::string want = dtype.cast<std::string>();
    bool found = false;
    for (int i = 0; i <= static_cast<int>(DType::kFloat8E5M2); ++i) {
      if (want == dtype_name(static_cast<DType>(i))) {
        c.dtype(static_cast<DType>(i));
        found = true;
      }
    }
    if (!found) AFDKIT_THROW(ValueError, "unknown dtype name '", want, "'");
  }
  if (!shape.is_none()) {
    auto dims = shape.cast<std::vector<int64_t>>();
    c.ndim(static_cast<int>(dims.size()));
    for (size_t i = 0; i < dims.size(); ++i)
      if (dims[i] != kAny) c.size(static_cast<int>(i), dims[i]);
  }
  if (!device.is_none()) {
    const std::string want = device.cast<std::string>();
    if (want == "cuda") {
      c.on_cuda();
    } else if (want == "cpu") {
      c.on(Device{DeviceKind::kCPU, 0});
    } else if (want.rfind("cuda:", 0) == 0) {
      c.on(Device{DeviceKind::kCUDA, std::stoi(want.substr(5))});
    } else {
      AFDKIT_THROW(ValueError, "unknown device name '", want, "'");
    }
  }
  if (contiguous) c.contiguous();
}

}  // namespace

void register_common(py::module_& m) {
  m.def("build_info", &build_info, "Version, git sha, nvcc version, CUDA arch, UCX version and transports.");
  m.def("cuda_device_count", &cuda_device_count, "Visible CUDA devices (0 without a driver).");
  auto t = m.def_submodule("_testing", "Hooks for afdkit's own tests of the DLPack boundary.");
  t.def("describe", &describe, py::arg("tensor"));
  t.def("reexport", &reexport, py::arg("tensor"), py::arg("versioned") = true);
  t.def("check_arg", &check_arg, py::arg("tensor"), py::arg("op"), py::arg("arg"), py::arg("dtype") = py::none(),
        py::arg("shape") = py::none(), py::arg("device") = py::none(), py::arg("contiguous") = false);
}

}  // namespace afdkit::bindings
