// What register.cc needs to expose an operator through ORT's OrtCustomOp.
#pragma once
#include <onnxruntime_c_api.h>

#include <cstddef>
#include <memory>
#include <string>

namespace bmoe {

// Session config entry naming the model's directory: a streamed angle_file is confined to it.
constexpr const char* kModelDirKey = "bmoe.model_dir";

// What RegisterCustomOps read from the session options (one per registration).
struct SessionConfig {
  std::string model_dir;  // kModelDirKey's value; empty when the entry is absent
};

struct OpDef {
  const char* name;
  size_t num_inputs;
  size_t num_required_inputs;  // inputs past this are optional
  // Kernel lifetime; `create` validates attributes and picks the kernel variant.
  OrtStatus* (*create)(const OrtApi* api, const OrtKernelInfo* info, const SessionConfig& cfg, void** kernel);
  OrtStatus* (*compute)(void* kernel, OrtKernelContext* ctx);
  void (*destroy)(void* kernel);
};

extern const OpDef kTernaryMatMulDef;
extern const OpDef kButterflyRotateDef;
extern const OpDef kAnglePrefetchDef;

// Shared by ButterflyRotate's streamed form and AnglePrefetch (butterfly_op.cc).
class AngleCache;
// The streamed-form attributes (angle_file ... cache_slots, cache_key) validated, and
// the cache they name (shared by cache_key), its file opened inside cfg.model_dir;
// nullptr if angle_file is absent and `required` is false. `*type`: the stored angle dtype.
std::shared_ptr<AngleCache> open_angle_stream(const OrtApi* api, const OrtKernelInfo* info, const SessionConfig& cfg,
                                              ONNXTensorElementDataType* type, bool required);
// Fills one expert's cos/sin table (S stages) from its raw stored angles.
void build_stream_table(ONNXTensorElementDataType type, const void* raw, float scale, size_t S, float* out);

}  // namespace bmoe
