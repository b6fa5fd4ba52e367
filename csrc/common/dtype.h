// The element types afdkit's ops accept, and their DLPack 1.1 codes.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

#include "common/dlpack.h"

namespace afdkit {

enum class DType : uint8_t {
  kBool,
  kUInt8,
  kInt8,
  kInt16,
  kInt32,
  kInt64,
  kFloat16,
  kBFloat16,
  kFloat32,
  kFloat64,
  kFloat8E4M3FN,  // DLPack kDLFloat8_e4m3fn = 10 (torch.float8_e4m3fn)
  kFloat8E5M2,    // DLPack kDLFloat8_e5m2 = 12 (torch.float8_e5m2)
};

// Names follow torch's spelling so error messages read like the caller's code.
const char* dtype_name(DType t);
size_t dtype_size(DType t);

// DLPack <-> DType. from_dlpack returns false for types afdkit has no use for
// (complex, vector lanes, other fp8 flavours); the caller names the argument.
bool dtype_from_dlpack(DLDataType dl, DType* out);
DLDataType dtype_to_dlpack(DType t);
std::string dlpack_dtype_str(DLDataType dl);

}  // namespace afdkit
