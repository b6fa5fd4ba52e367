#include "common/dtype.h"

#include "common/errors.h"

namespace afdkit {

namespace {
struct DTypeInfo {
  DType dtype;
  const char* name;
  uint8_t code;
  uint8_t bits;
};
constexpr DTypeInfo kDTypes[] = {
    {DType::kBool, "bool", kDLBool, 8},
    {DType::kUInt8, "uint8", kDLUInt, 8},
    {DType::kInt8, "int8", kDLInt, 8},
    {DType::kInt16, "int16", kDLInt, 16},
    {DType::kInt32, "int32", kDLInt, 32},
    {DType::kInt64, "int64", kDLInt, 64},
    {DType::kFloat16, "float16", kDLFloat, 16},
    {DType::kBFloat16, "bfloat16", kDLBfloat, 16},
    {DType::kFloat32, "float32", kDLFloat, 32},
    {DType::kFloat64, "float64", kDLFloat, 64},
    {DType::kFloat8E4M3FN, "float8_e4m3fn", kDLFloat8_e4m3fn, 8},
    {DType::kFloat8E5M2, "float8_e5m2", kDLFloat8_e5m2, 8},
};

const DTypeInfo& info(DType t) {
  for (const auto& i : kDTypes)
    if (i.dtype == t) return i;
  AFDKIT_THROW(ValueError, "unknown afdkit dtype ", static_cast<int>(t));
}
}  // namespace

const char* dtype_name(DType t) { return info(t).name; }
size_t dtype_size(DType t) { return info(t).bits / 8; }

bool dtype_from_dlpack(DLDataType dl, DType* out) {
  if (dl.lanes != 1) return false;
  for (const auto& i : kDTypes) {
    if (i.code == dl.code && i.bits == dl.bits) {
      *out = i.dtype;
      return true;
    }
  }
  return false;
}

DLDataType dtype_to_dlpack(DType t) {
  const auto& i = info(t);
  return DLDataType{i.code, i.bits, 1};
}

std::string dlpack_dtype_str(DLDataType dl) {
  DType t;
  if (dtype_from_dlpack(dl, &t)) return dtype_name(t);
  return str_cat("dlpack(code=", int(dl.code), ", bits=", int(dl.bits), ", lanes=", dl.lanes, ")");
}

}  // namespace afdkit
