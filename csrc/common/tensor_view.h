// A non-owning view of a tensor handed over through DLPack, plus the argument
// checks every op runs before it launches anything. Errors name the op, the
// argument, what was expected and what was given.
#pragma once
#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#include "common/dtype.h"

namespace afdkit {

enum class DeviceKind : uint8_t { kCPU, kCUDA, kCUDAHost, kCUDAManaged };

struct Device {
  DeviceKind kind = DeviceKind::kCPU;
  int index = 0;
  bool is_cuda() const { return kind == DeviceKind::kCUDA || kind == DeviceKind::kCUDAManaged; }
  // Host-addressable memory: plain CPU memory and pinned (cudaHostAlloc) memory.
  bool is_host() const { return kind == DeviceKind::kCPU || kind == DeviceKind::kCUDAHost; }
  bool operator==(const Device& o) const { return kind == o.kind && (kind == DeviceKind::kCPU || index == o.index); }
  bool operator!=(const Device& o) const { return !(*this == o); }
  std::string str() const;  // "cpu", "cuda:0", "cuda_host", "cuda_managed:0"
};

struct TensorView {
  void* data = nullptr;  // already includes DLPack's byte_offset
  DType dtype = DType::kFloat32;
  Device device;
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;  // in elements, always filled (compact if DLPack gave none)
  bool read_only = false;

  int ndim() const { return static_cast<int>(shape.size()); }
  int64_t size(int dim) const { return shape.at(wrap(dim)); }
  int64_t stride(int dim) const { return strides.at(wrap(dim)); }
  int64_t numel() const;
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype); }
  bool is_contiguous() const;
  template <class T>
  T* ptr() const { return static_cast<T*>(data); }
  std::string describe() const;  // "bfloat16[4, 64, 256] on cuda:0"

 private:
  int wrap(int dim) const { return dim < 0 ? dim + ndim() : dim; }
};

std::string shape_str(const std::vector<int64_t>& shape);

// kAny in an expected shape matches any size of that dimension.
constexpr int64_t kAny = -1;

// Fluent checks: check("afdkit.mfa.decode", "q", q).dtype(DType::kBFloat16).ndim(4)...
class ArgCheck {
 public:
  ArgCheck(const char* op, const char* arg, const TensorView& t) : op_(op), arg_(arg), t_(t) {}
  const ArgCheck& dtype(DType expected) const;
  const ArgCheck& dtype_in(std::initializer_list<DType> allowed) const;
  const ArgCheck& ndim(int expected) const;
  const ArgCheck& shape(std::initializer_list<int64_t> expected) const;
  const ArgCheck& size(int dim, int64_t expected, const char* what = nullptr) const;
  const ArgCheck& contiguous() const;
  const ArgCheck& last_dim_contiguous() const;
  const ArgCheck& on(const Device& expected) const;
  const ArgCheck& on_cuda() const;
  const ArgCheck& writable() const;

 private:
  std::string prefix() const;
  const char* op_;
  const char* arg_;
  const TensorView& t_;
};

inline ArgCheck check(const char* op, const char* arg, const TensorView& t) { return ArgCheck(op, arg, t); }

// All tensors of one call on one device; names the first that differs.
void check_same_device(const char* op, std::initializer_list<std::pair<const char*, const TensorView*>> args);

}  // namespace afdkit
