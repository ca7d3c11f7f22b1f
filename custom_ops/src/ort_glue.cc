#include "ort_glue.h"

#include <cstdio>
#include <limits>
#include <memory>

namespace bmoe {

void check_ort(const OrtApi* api, OrtStatus* st) {
  if (!st) return;
  std::string msg = api->GetErrorMessage(st);
  api->ReleaseStatus(st);
  throw OpError(msg);
}

size_t Tensor::numel() const {
  size_t n = 1;
  for (int64_t d : shape) n = checked_mul(n, static_cast<size_t>(d), "tensor element count");
  return n;
}

const char* type_name(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "float64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return "bfloat16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return "int8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT16: return "int16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL: return "bool";
    default: return "unsupported type";
  }
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

namespace {
using InfoPtr = std::unique_ptr<OrtTensorTypeAndShapeInfo, void (*)(OrtTensorTypeAndShapeInfo*)>;

Tensor describe(const OrtApi* api, const OrtValue* v) {
  Tensor t;
  if (!v) return t;
  int is_tensor = 0;
  check_ort(api, api->IsTensor(v, &is_tensor));
  if (!is_tensor) throw OpError("input is not a tensor");
  OrtTensorTypeAndShapeInfo* raw = nullptr;
  check_ort(api, api->GetTensorTypeAndShape(v, &raw));
  InfoPtr info(raw, api->ReleaseTensorTypeAndShapeInfo);
  size_t rank = 0;
  check_ort(api, api->GetTensorElementType(info.get(), &t.type));
  check_ort(api, api->GetDimensionsCount(info.get(), &rank));
  t.shape.resize(rank);
  if (rank) check_ort(api, api->GetDimensions(info.get(), t.shape.data(), rank));
  // Strings have no flat buffer; callers reject their dtype before touching data.
  if (t.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_STRING) {
    void* data = nullptr;  // API 21 has no const accessor; the data is only read
    check_ort(api, api->GetTensorMutableData(const_cast<OrtValue*>(v), &data));
    t.data = data;
  }
  t.present = true;
  return t;
}
}  // namespace

Tensor input(const OrtApi* api, OrtKernelContext* ctx, size_t index) {
  size_t count = 0;
  check_ort(api, api->KernelContext_GetInputCount(ctx, &count));
  if (index >= count) return {};
  const OrtValue* v = nullptr;
  check_ort(api, api->KernelContext_GetInput(ctx, index, &v));
  return describe(api, v);
}

void* output(const OrtApi* api, OrtKernelContext* ctx, size_t index, const std::vector<int64_t>& shape) {
  OrtValue* v = nullptr;
  check_ort(api, api->KernelContext_GetOutput(ctx, index, shape.data(), shape.size(), &v));
  void* data = nullptr;
  check_ort(api, api->GetTensorMutableData(v, &data));
  return data;
}

namespace {
bool ok(const OrtApi* api, OrtStatus* st) {
  if (!st) return true;
  api->ReleaseStatus(st);
  return false;
}

// The message of a failed status ("" for success), which is released.
std::string error_of(const OrtApi* api, OrtStatus* st) {
  if (!st) return "";
  std::string msg = api->GetErrorMessage(st);
  api->ReleaseStatus(st);
  return msg.empty() ? "error" : msg;
}

// What attribute `name` is, when reading it as the declared type failed with `why`: "" if
// it is absent. (The list getters of API 21 do not check the attribute's type, so an empty
// list is not told apart from other kinds: ORT's message says whether the name exists.)
std::string actual_type(const OrtApi* api, const OrtKernelInfo* info, const char* name, const std::string& why) {
  int64_t i = 0;
  float f = 0;
  size_t n = 0;
  if (ok(api, api->KernelInfoGetAttribute_int64(info, name, &i))) return "an int (" + std::to_string(i) + ")";
  if (ok(api, api->KernelInfoGetAttribute_float(info, name, &f))) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.9g", static_cast<double>(f));
    const bool plain = std::string(buf).find_first_of(".ein") == std::string::npos;
    return std::string("a float (") + buf + (plain ? ".0)" : ")");
  }
  if (ok(api, api->KernelInfoGetAttribute_string(info, name, nullptr, &n))) return "a string";
  OrtAllocator* alloc = nullptr;
  OrtValue* t = nullptr;
  if (ok(api, api->GetAllocatorWithDefaultOptions(&alloc)) &&
      ok(api, api->KernelInfoGetAttribute_tensor(info, name, alloc, &t))) {
    api->ReleaseValue(t);
    return "a tensor";
  }
  if (ok(api, api->KernelInfoGetAttributeArray_int64(info, name, nullptr, &n)) && n) return "a list of ints";
  if (ok(api, api->KernelInfoGetAttributeArray_float(info, name, nullptr, &n)) && n) return "a list of floats";
  if (why.find("No attribute") != std::string::npos) return "";
  return "another type (" + why + ")";
}

[[noreturn]] void wrong_type(const char* name, const char* want, const std::string& got) {
  throw OpError(std::string("attribute ") + name + " must be " + want + ", got " + got);
}
}  // namespace

int64_t attr_int(const OrtApi* api, const OrtKernelInfo* info, const char* name, int64_t dflt, bool* found) {
  int64_t v = 0;
  const std::string why = error_of(api, api->KernelInfoGetAttribute_int64(info, name, &v));
  const bool has = why.empty();
  if (!has) {
    const std::string got = actual_type(api, info, name, why);
    if (!got.empty()) wrong_type(name, "an int", got);
  }
  if (found) *found = has;
  return has ? v : dflt;
}

std::string attr_string(const OrtApi* api, const OrtKernelInfo* info, const char* name, const std::string& dflt,
                        bool* found) {
  size_t size = 0;
  const std::string why = error_of(api, api->KernelInfoGetAttribute_string(info, name, nullptr, &size));
  const bool has = why.empty();
  if (found) *found = has;
  if (!has) {
    const std::string got = actual_type(api, info, name, why);
    if (!got.empty()) wrong_type(name, "a string", got);
    return dflt;
  }
  std::string s(size, '\0');
  check_ort(api, api->KernelInfoGetAttribute_string(info, name, &s[0], &size));
  s.resize(size ? size - 1 : 0);  // size counts the terminating NUL
  return s;
}

size_t checked_mul(size_t a, size_t b, const char* what) {
  if (b && a > std::numeric_limits<size_t>::max() / b) throw OpError(std::string(what) + " is too large");
  return a * b;
}

size_t checked_add(size_t a, size_t b, const char* what) {
  if (a > std::numeric_limits<size_t>::max() - b) throw OpError(std::string(what) + " is too large");
  return a + b;
}

Tensor constant_input(const OrtApi* api, const OrtKernelInfo* info, size_t index) {
  size_t count = 0;
  check_ort(api, api->KernelInfo_GetInputCount(info, &count));
  if (index >= count) return {};
  int is_const = 0;
  const OrtValue* v = nullptr;
  OrtStatus* st = api->KernelInfoGetConstantInput_tensor(info, index, &is_const, &v);
  if (st) {
    api->ReleaseStatus(st);
    return {};
  }
  return is_const ? describe(api, v) : Tensor{};
}

}  // namespace bmoe
