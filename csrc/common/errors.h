// Exceptions of the native core. The bindings translate them to the Python
// exceptions of the same name, so a wrong argument surfaces as TypeError/ValueError
// naming the op and the argument instead of a crash or a generic RuntimeError.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace afdkit {

struct TypeError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct ValueError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// A CUDA runtime or driver call failed (launch error, illegal address, ...).
struct CudaError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

template <class... Args>
std::string str_cat(Args&&... args) {
  std::ostringstream os;
  (os << ... << std::forward<Args>(args));
  return os.str();
}

}  // namespace afdkit

#define AFDKIT_THROW(ExcType, ...) throw ::afdkit::ExcType(::afdkit::str_cat(__VA_ARGS__))

// Checks an invariant the caller must hold; the message says what was expected.
#define AFDKIT_CHECK(cond, ...)                                            \
  do {                                                                     \
    if (!(cond)) AFDKIT_THROW(ValueError, __VA_ARGS__);                    \
  } while (0)
