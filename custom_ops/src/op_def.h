// What register.cc needs to expose an operator through ORT's OrtCustomOp.
#pragma once
#include <onnxruntime_c_api.h>

#include <cstddef>

namespace bmoe {

struct OpDef {
  const char* name;
  size_t num_inputs;
  size_t num_required_inputs;  // inputs past this are optional
  // Kernel lifetime; `create` validates attributes and picks the kernel variant.
  OrtStatus* (*create)(const OrtApi* api, const OrtKernelInfo* info, void** kernel);
  OrtStatus* (*compute)(void* kernel, OrtKernelContext* ctx);
  void (*destroy)(void* kernel);
};

extern const OpDef kTernaryMatMulDef;
extern const OpDef kButterflyRotateDef;

}  // namespace bmoe
