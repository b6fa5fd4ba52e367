// One register_<part>(m) per native part; module.cpp calls them in order.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>

#include <cuda_runtime_api.h>

namespace afdkit::bindings {

namespace py = pybind11;

void register_common(py::module_& m);
void register_quant(py::module_& m);
void register_mesh(py::module_& m);
void register_moe(py::module_& m);
void register_dispatch(py::module_& m);
void register_mfa(py::module_& m);

// Streams cross the boundary as integers (torch.cuda.Stream.cuda_stream).
inline cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

}  // namespace afdkit::bindings
