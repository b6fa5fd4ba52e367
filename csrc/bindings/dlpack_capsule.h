// The DLPack boundary of the Python module: borrow a producer's tensor for the
// length of one call, or export a view of memory afdkit owns.
#pragma once
#include <pybind11/pybind11.h>

#include <memory>

#include "common/tensor_view.h"

namespace afdkit::bindings {

namespace py = pybind11;

// A tensor borrowed from a DLPack producer; the producer's deleter runs when the
// last copy of `owner` goes away (after the op has enqueued its work; the caller
// keeps the framework tensor alive until the stream is done with it).
struct Borrowed {
  TensorView view;
  std::shared_ptr<void> owner;
  const TensorView* operator->() const { return &view; }
  const TensorView& operator*() const { return view; }
};

// `obj` is a DLPack capsule ("dltensor_versioned" or legacy "dltensor") or any
// object with __dlpack__. Raises TypeError naming `op` and `arg` otherwise, or for
// element types afdkit does not know.
Borrowed borrow(py::handle obj, const char* op, const char* arg);
// None -> nullopt-like empty Borrowed (view.data == nullptr, owner empty).
Borrowed borrow_optional(py::handle obj, const char* op, const char* arg);

// A capsule viewing `view`'s memory; `keepalive` is referenced until the consumer
// calls the deleter. versioned=true gives a DLPack 1.1 "dltensor_versioned".
py::capsule export_capsule(const TensorView& view, py::object keepalive, bool versioned);

}  // namespace afdkit::bindings
