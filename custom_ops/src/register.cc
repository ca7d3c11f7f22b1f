// Registration entry points. Only these two symbols are exported. The operators
// are described with the plain C OrtCustomOp struct and use nothing but the OrtApi
// obtained from the OrtApiBase passed in, so the library does not link onnxruntime.
#include <mutex>
#include <new>
#include <vector>

#include "op_def.h"
#include "ort_glue.h"

#define BMOE_EXPORT extern "C" __attribute__((visibility("default")))

namespace bmoe {
namespace {

constexpr const char* kDomain = "ai.bmoe";

// OrtCustomOp first, so ORT's `const OrtCustomOp*` leads back to our OpDef.
struct CustomOp {
  OrtCustomOp op;
  const OpDef* def;
};

// A kernel as ORT sees it: KernelCompute gets no OrtCustomOp, so keep the OpDef here.
struct Handle {
  const OpDef* def;
  void* impl;
};

const OpDef& def_of(const OrtCustomOp* op) { return *reinterpret_cast<const CustomOp*>(op)->def; }

CustomOp make_op(const OpDef* def) {
  CustomOp c{};
  OrtCustomOp& o = c.op;
  o.version = kOrtApiVersion;  // the struct layout we were compiled with
  c.def = def;
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
    OrtStatus* st = h->def->create(api, info, &h->impl);
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
  return c;
}

OrtStatus* register_ops(OrtSessionOptions* options, const OrtApiBase* base) {
  const OrtApi* api = base ? base->GetApi(kOrtApiVersion) : nullptr;
  if (!api) return nullptr;  // ORT older than 1.21: no API to even report the error with
  return guarded(api, "RegisterCustomOps", [&] {
    static CustomOp ops[] = {make_op(&kTernaryMatMulDef), make_op(&kButterflyRotateDef),
                             make_op(&kAnglePrefetchDef)};
    OrtCustomOpDomain* domain = nullptr;
    check_ort(api, api->CreateCustomOpDomain(kDomain, &domain));
    // ORT does not own the domain and it must outlive every session using it:
    // keep it for the life of the process.
    static std::mutex mu;
    static std::vector<OrtCustomOpDomain*> domains;
    {
      std::lock_guard<std::mutex> lock(mu);
      domains.push_back(domain);
    }
    for (CustomOp& c : ops) check_ort(api, api->CustomOpDomain_Add(domain, &c.op));
    check_ort(api, api->AddCustomOpDomain(options, domain));
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
