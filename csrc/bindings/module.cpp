// afdkit._C: the native core. Tensors come in through DLPack; no libtorch.
#include <pybind11/pybind11.h>

#include "bindings/registry.h"
#include "common/errors.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "afdkit native core (FP8 MFA decode, MoE dispatch/combine, mesh transport)";

  // C++ exception types -> the Python exceptions a caller expects to catch.
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const afdkit::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    } catch (const afdkit::ValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });
  static py::exception<afdkit::CudaError> cuda_error(m, "CudaError", PyExc_RuntimeError);

  afdkit::bindings::register_common(m);
  afdkit::bindings::register_quant(m);
  afdkit::bindings::register_mesh(m);
  afdkit::bindings::register_moe(m);
  afdkit::bindings::register_dispatch(m);
  afdkit::bindings::register_mfa(m);
}
