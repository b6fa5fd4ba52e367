// Exceptions of the native core. The bindings translate them to the Python
// exceptions of the same name, so a wrong argument surfaces as TypeError/ValueError
// naming the op and the argument instead of a crash or a generic RuntimeError.
#pragma once
#include <stdexcept>
#include <cstdio>
#include <string>
#include <type_traits>
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

// Message building without iostreams: an ostringstream's locale machinery crashed
// when the module was built by a newer GCC than the libstdc++ the process loaded.
namespace detail {
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, const char* v) { s += v ? v : "(null)"; }
inline void append(std::string& s, char v) { s += v; }
inline void append(std::string& s, bool v) { s += v ? "true" : "false"; }
// Pointers print as hex addresses (without this overload they would convert to bool).
inline void append(std::string& s, const void* v) {
  char buf[2 + 2 * sizeof(void*) + 1];
  std::snprintf(buf, sizeof(buf), "%p", v);
  s += buf;
}
template <class T, std::enable_if_t<std::is_integral_v<T> || std::is_floating_point_v<T>, int> = 0>
void append(std::string& s, T v) { s += std::to_string(v); }
template <class T, std::enable_if_t<std::is_enum_v<T>, int> = 0>
void append(std::string& s, T v) { s += std::to_string(static_cast<long long>(v)); }
}  // namespace detail

template <class... Args>
std::string str_cat(Args&&... args) {
  std::string s;
  (detail::append(s, std::forward<Args>(args)), ...);
  return s;
}

}  // namespace afdkit

#define AFDKIT_THROW(ExcType, ...) throw ::afdkit::ExcType(::afdkit::str_cat(__VA_ARGS__))

// Checks an invariant the caller must hold; the message says what was expected.
#define AFDKIT_CHECK(cond, ...)                                            \
  do {                                                                     \
    if (!(cond)) AFDKIT_THROW(ValueError, __VA_ARGS__);                    \
  } while (0)
