// Registration entry points. Only these two symbols are exported. The operators
// are described with the plain C OrtCustomOp struct and use nothing but the OrtApi
// obtained from the OrtApiBase passed in, so the library does not link onnxruntime.
#include <memory>
#include <new>
#include <string>

#include "op_def.h"
#include "ort_glue.h"

#define BMOE_EXPORT extern "C" __attribute__((visibility("default")))

namespace bmoe {
namespace {

constexpr const char* kDomain = "ai.bmoe";

// OrtCustomOp first, so ORT's `const OrtCustomOp*` leads back to our OpDef and to the
// session config of the registration that made it.
struct CustomOp {
  OrtCustomOp op;
  const OpDef* def;
  const SessionConfig* cfg;
};

// A kernel as ORT sees it: KernelCompute gets no OrtCustomOp, so keep the OpDef here.
struct Handle {
  const OpDef* def;
  void* impl;
};

const CustomOp& custom_of(const OrtCustomOp* op) { return *reinterpret_cast<const CustomOp*>(op); }
const OpDef& def_of(const OrtCustomOp* op) { return *custom_of(op).def; }

void make_op(CustomOp& c, const OpDef* def, const SessionConfig* cfg) {
  c = CustomOp{};
  OrtCustomOp& o = c.op;
  o.version = kOrtApiVersion;  // the struct layout we were compiled with
  c.def = def;
  c.cfg = cfg;
  o.GetName = [](const OrtCustomOp* op) { return def_of(op).name; };
  o.GetExecutionProviderType = [](const OrtCustomOp*) -> const char* { return nullptr; };  // CPU
  // Inputs are declared type-agnostic so that dtype errors reach our own messages.
  o.GetInputType = [](const OrtCustomOp*, size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED; };
  o.GetInputTypeCount = [](const OrtCustomOp* op) { return def_of(op).num_inputs; };
  o.GetOutputType = [](const OrtCustomOp*, size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; };
  o.GetOutputTypeCount = [](const OrtCustomOp*) { return size_t{1}; };
  o.GetInputCharacteristic = [](const OrtCustomOp* op, size_t i) {
    return i < def_of(op).num_required_inputs ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  };
  o.GetOutputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
  o.GetInputMemoryType = [](const OrtCustomOp*, size_t) { return OrtMemTypeDefault; };
  o.GetVariadicInputMinArity = [](const OrtCustomOp*) { return 1; };
  o.GetVariadicInputHomogeneity = [](const OrtCustomOp*) { return 1; };
  o.GetVariadicOutputMinArity = [](const OrtCustomOp*) { return 1; };
  o.GetVariadicOutputHomogeneity = [](const OrtCustomOp*) { return 1; };
  o.CreateKernelV2 = [](const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info, void** kernel) {
    auto* h = new (std::nothrow) Handle{&def_of(op), nullptr};
    if (!h) return api->CreateStatus(ORT_FAIL, "out of memory");
    OrtStatus* st = h->def->create(api, info, *custom_of(op).cfg, &h->impl);
    if (st) delete h;
    else *kernel = h;
    return st;
  };
  o.KernelComputeV2 = [](void* kernel, OrtKernelContext* ctx) {
    auto* h = static_cast<Handle*>(kernel);
    return h->def->compute(h->impl, ctx);
  };
  o.KernelDestroy = [](void* kernel) {
    auto* h = static_cast<Handle*>(kernel);
    h->def->destroy(h->impl);
    delete h;
  };
  o.GetStartVersion = [](const OrtCustomOp*) { return 1; };
  o.GetEndVersion = [](const OrtCustomOp*) { return 1; };
}

// One registration's ops and the session config they see. ORT owns neither the domain
// nor the ops, and both must outlive every session using them: kept for the life of the
// process (a few hundred bytes a registration).
struct Registration {
  SessionConfig cfg;
  CustomOp ops[3];
  OrtCustomOpDomain* domain = nullptr;
};

std::string config_entry(const OrtApi* api, const OrtSessionOptions* options, const char* key) {
  int has = 0;
  check_ort(api, api->HasSessionConfigEntry(options, key, &has));
  if (!has) return "";
  size_t size = 0;
  check_ort(api, api->GetSessionConfigEntry(options, key, nullptr, &size));
  std::string v(size, '\0');
  check_ort(api, api->GetSessionConfigEntry(options, key, &v[0], &size));
  v.resize(size ? size - 1 : 0);  // size counts the terminating NUL
  return v;
}

OrtStatus* register_ops(OrtSessionOptions* options, const OrtApiBase* base) {
  const OrtApi* api = base ? base->GetApi(kOrtApiVersion) : nullptr;
  if (!api) return nullptr;  // ORT older than 1.21: no API to even report the error with
  return guarded(api, "RegisterCustomOps", [&] {
    auto reg = std::make_unique<Registration>();
    // Read now: ORT offers custom ops no access to the session options later (API 21).
    reg->cfg.model_dir = config_entry(api, options, kModelDirKey);
    const OpDef* defs[] = {&kTernaryMatMulDef, &kButterflyRotateDef, &kAnglePrefetchDef};
    for (size_t i = 0; i < 3; ++i) make_op(reg->ops[i], defs[i], &reg->cfg);
    check_ort(api, api->CreateCustomOpDomain(kDomain, &reg->domain));
    Registration* r = reg.release();  // never freed (see Registration)
    for (CustomOp& c : r->ops) check_ort(api, api->CustomOpDomain_Add(r->domain, &c.op));
    check_ort(api, api->AddCustomOpDomain(options, r->domain));
  });
}

}  // namespace
}  // namespace bmoe

// Entry point looked up by OrtSessionOptions::register_custom_ops_library.
BMOE_EXPORT OrtStatus* RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api) {
  return bmoe::register_ops(options, api);
}

// Plainly named alias for static linking (e.g. RegisterCustomOpsUsingFunction on mobile).
BMOE_EXPORT OrtStatus* BmoeRegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api) {
  return bmoe::register_ops(options, api);
}
