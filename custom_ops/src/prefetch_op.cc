// AnglePrefetch operator (docs/ops.md, "AnglePrefetch"): router look-ahead. Given
// the expert ids that a later layer is predicted to use, reads their angle slices
// into the streamed-angle cache shared (by cache_key) with that layer's
// ButterflyRotate nodes, then returns X unchanged (copied): wiring X through the
// node orders it before whatever consumes Y.
//
// Loads are synchronous (done before Run returns). A prefetch is advisory: a
// read error skips that expert (the ButterflyRotate that needs it reports it);
// invalid inputs or attributes are errors like the other ops'.
#include <cstring>
#include <exception>
#include <string>
#include <unordered_set>
#include <vector>

#include "angle_cache.h"
#include "op_def.h"
#include "ort_glue.h"

namespace bmoe {
namespace {

struct Kernel {
  const OrtApi* api;
  std::shared_ptr<AngleCache> cache;
  ONNXTensorElementDataType type;

  void compute(OrtKernelContext* ctx) const;
};

Kernel* create(const OrtApi* api, const OrtKernelInfo* info, const SessionConfig& cfg) {
  if (attr_string(api, info, "cache_key", "").empty())
    throw OpError("attribute cache_key is required (the cache of the ButterflyRotate nodes it fills)");
  std::unique_ptr<Kernel> k(new Kernel{api, nullptr, ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED});
  k->cache = open_angle_stream(api, info, cfg, &k->type, true);
  return k.release();
}

void Kernel::compute(OrtKernelContext* ctx) const {
  const Tensor X = input(api, ctx, 0), ids = input(api, ctx, 1), scale = input(api, ctx, 2);
  if (X.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) throw OpError(std::string("input X must be float32, got ") + type_name(X.type));
  if (ids.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64)
    throw OpError(std::string("input expert_ids must be int64, got ") + type_name(ids.type));
  const size_t E = cache->experts(), C = cache->slots(), n = ids.numel();
  const int64_t* id = static_cast<const int64_t*>(ids.data);
  for (size_t i = 0; i < n; ++i)
    if (id[i] < 0 || id[i] >= static_cast<int64_t>(E))
      throw OpError("input expert_ids[" + std::to_string(i) + "] = " + std::to_string(id[i]) + " is out of range [0, " +
                    std::to_string(E) + ")");
  const float* scales = nullptr;
  if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8) {
    if (!scale.present) throw OpError("input angle_scale is required when angle_dtype is int8");
    if (scale.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
      throw OpError(std::string("input angle_scale must be float32, got ") + type_name(scale.type));
    if (scale.shape.size() != 1 || scale.shape[0] != static_cast<int64_t>(E))
      throw OpError("input angle_scale must have shape [E] = [" + std::to_string(E) + "], got " + shape_str(scale.shape));
    scales = static_cast<const float*>(scale.data);
  } else if (scale.present) {
    throw OpError(std::string("input angle_scale must be omitted when angle_dtype is ") + type_name(type));
  }

  float* Y = static_cast<float*>(output(api, ctx, 0, X.shape));
  if (X.numel()) std::memcpy(Y, X.data, X.numel() * sizeof(float));

  // S is known once a ButterflyRotate has used the cache; before that, nothing to do.
  const size_t S = cache->stages();
  if (S == 0) return;
  cache->check_extent(S);  // as the rotate that set S did
  // Distinct experts in order of first appearance (for top-k ids: best first), at most
  // C: a prefetch never evicts what it just brought in.
  std::vector<size_t> want;
  std::unordered_set<size_t> seen;  // memory independent of E
  for (size_t i = 0; i < n && want.size() < C; ++i)
    if (seen.insert(static_cast<size_t>(id[i])).second) want.push_back(static_cast<size_t>(id[i]));
  for (size_t e : want) {
    const float sc = scales ? scales[e] : 1.0f;
    uint32_t tag;
    std::memcpy(&tag, &sc, 4);
    if (cache->touch(e, S, tag)) continue;  // already cached: keep it (most recent)
    AngleCache::Table t;
    try {
      t = cache->load(e, S, [&](const void* raw, float* out) { build_stream_table(type, raw, sc, S, out); }, true);
    } catch (const std::exception&) {
      continue;  // advisory: the rotate that needs e reports the error
    }
    cache->insert(e, S, tag, t, true);
  }
}

}  // namespace

const OpDef kAnglePrefetchDef = {
    "AnglePrefetch", 3, 2,
    [](const OrtApi* api, const OrtKernelInfo* info, const SessionConfig& cfg, void** k) {
      return guarded(api, "AnglePrefetch", [&] { *k = create(api, info, cfg); });
    },
    [](void* k, OrtKernelContext* ctx) {
      auto* kernel = static_cast<Kernel*>(k);
      return guarded(kernel->api, "AnglePrefetch", [&] { kernel->compute(ctx); });
    },
    [](void* k) { delete static_cast<Kernel*>(k); },
};

}  // namespace bmoe
