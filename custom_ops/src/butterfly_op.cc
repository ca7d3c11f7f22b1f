// ButterflyRotate operator: validation (docs/ops.md), cos/sin tables, and rows
// spread over ORT's intra-op thread pool.
//
// cos/sin tables: when `angles` (and `angle_scale`) are constant initializers —
// the exported-model case — the tables of all experts are built once at kernel
// creation and never change, so Run needs no cache, lock or checksum and is
// trivially thread-safe. Otherwise the tables are built per call, only for the
// experts that call references: always correct whatever the inputs, and the
// sin/cos cost (S·P/2 per expert) is no more than one row's worth of rotations
// per referenced expert.
//
// Streamed form (attribute angle_file, input 1 omitted): the tables come from a
// per-node AngleCache (angle_cache.h) of at most cache_slots experts, filled from
// the file on demand. Rows are processed grouped by expert, at most cache_slots
// experts at a time, so any C >= 1 works whatever a call references.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "angle_cache.h"
#include "butterfly.h"
#include "cpu.h"
#include "op_def.h"
#include "ort_glue.h"

namespace bmoe {
namespace {

using namespace butterfly;

RotateFn rotate_for(Variant v) {
  switch (v) {
#if defined(__x86_64__) || defined(__i386__)
    case Variant::Avx2: return rotate_avx2;
    case Variant::Avx512: return rotate_avx512;
#endif
#if defined(__aarch64__)
    case Variant::Neon:
    case Variant::Dotprod: return rotate_neon;
#endif
    default: return rotate_scalar;
  }
}

float half_to_float(uint16_t h) {  // exact widening
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  if (exp == 0) {  // zero or subnormal: man · 2^-24
    const float v = std::ldexp(static_cast<float>(man), -24);
    return sign ? -v : v;
  }
  const uint32_t bits = sign | (exp == 31 ? 0x7f800000u | (man << 13) : ((exp + 112) << 23) | (man << 13));
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Angles of one expert, dequantised to float32 (docs/ops.md).
float angle(const Tensor& angles, const Tensor& scale, size_t e, size_t i, size_t per_expert) {
  const size_t idx = e * per_expert + i;
  switch (angles.type) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return static_cast<const float*>(angles.data)[idx];
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return half_to_float(static_cast<const uint16_t*>(angles.data)[idx]);
    default:
      return static_cast<float>(static_cast<const int8_t*>(angles.data)[idx]) * static_cast<const float*>(scale.data)[e];
  }
}

void build_table(const Tensor& angles, const Tensor& scale, size_t e, size_t S, float* out) {
  const size_t P = size_t{1} << S, per_expert = S * P / 2;
  for (size_t s = 0; s < S; ++s) {
    const size_t h = size_t{1} << s;
    float* c = out + stage_offset(s, P);
    for (size_t k = 0; k < P / 2; ++k) {
      const float th = angle(angles, scale, e, s * P / 2 + k, per_expert);
      const float cs = std::cos(th), sn = std::sin(th);
      if (h < kChunk) {
        const size_t j = (k >> s) << (s + 1) | (k & (h - 1));
        c[j] = c[j + h] = cs;
        c[P + j] = -sn;
        c[P + j + h] = sn;
      } else {
        c[k] = cs;
        c[P / 2 + k] = sn;
      }
    }
  }
}

// Largest D (and so at most 24 stages): keeps every table size and index far from overflow.
constexpr int64_t kMaxDim = int64_t{1} << 24;

bool is_angle_type(ONNXTensorElementDataType t) {
  return t == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || t == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 ||
         t == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
}

size_t angle_bytes(ONNXTensorElementDataType t) {
  return t == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT ? 4 : t == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 ? 2 : 1;
}

struct Kernel {
  const OrtApi* api;
  bool transpose;
  RotateFn rotate;
  std::vector<float> const_tables;  // E tables when angles are constant, else empty
  std::shared_ptr<AngleCache> stream;  // streamed form, else null (shared by cache_key)
  ONNXTensorElementDataType stream_type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;

  void compute(OrtKernelContext* ctx) const;
  void compute_streamed(const float* x, float* Y, size_t M, size_t D, size_t S, const int64_t* idx,
                        const Tensor& scale, OrtKernelContext* ctx) const;
};

Kernel* create(const OrtApi* api, const OrtKernelInfo* info, const SessionConfig& cfg) {
  const int64_t t = attr_int(api, info, "transpose", 0);
  if (t != 0 && t != 1) throw OpError("attribute transpose must be 0 or 1, got " + std::to_string(t));
  std::unique_ptr<Kernel> k(new Kernel{api, t == 1, rotate_for(select_variant()), {}, nullptr});
  k->stream = open_angle_stream(api, info, cfg, &k->stream_type, false);
  if (k->stream) {
    if (constant_input(api, info, 1).present) throw OpError("input angles must be omitted when angle_file is set");
    return k.release();
  }
  const Tensor angles = constant_input(api, info, 1), scale = constant_input(api, info, 3);
  // Precompute only for well-formed constants; anything else is reported by compute.
  if (angles.present && is_angle_type(angles.type) && angles.shape.size() == 3 && angles.shape[0] >= 1 &&
      angles.shape[1] >= 1 && angles.shape[1] <= 30 && angles.shape[2] == (int64_t{1} << angles.shape[1]) / 2 &&
      (angles.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 ||
       (scale.present && scale.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && scale.shape.size() == 1 &&
        scale.shape[0] == angles.shape[0]))) {
    const size_t E = static_cast<size_t>(angles.shape[0]), S = static_cast<size_t>(angles.shape[1]);
    const size_t tf = table_floats(S, size_t{1} << S);
    k->const_tables.resize(E * tf);
    for (size_t e = 0; e < E; ++e) build_table(angles, scale, e, S, &k->const_tables[e * tf]);
  }
  return k.release();
}

void Kernel::compute(OrtKernelContext* ctx) const {
  const Tensor X = input(api, ctx, 0), angles = input(api, ctx, 1), index = input(api, ctx, 2),
               scale = input(api, ctx, 3);
  if (X.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) throw OpError(std::string("input X must be float32, got ") + type_name(X.type));
  if (X.shape.size() != 2) throw OpError("input X must have rank 2 [M, D], got shape " + shape_str(X.shape));
  if (X.shape[1] < 2) throw OpError("input X must have D >= 2 columns, got shape " + shape_str(X.shape));
  if (X.shape[1] > kMaxDim)
    throw OpError("input X must have D <= " + std::to_string(kMaxDim) + " columns, got shape " + shape_str(X.shape));
  const size_t M = static_cast<size_t>(X.shape[0]), D = static_cast<size_t>(X.shape[1]);
  size_t S = 1;
  while ((size_t{1} << S) < D) ++S;
  const size_t P = size_t{1} << S;

  size_t E;
  ONNXTensorElementDataType angle_type;
  if (stream) {
    if (angles.present) throw OpError("input angles must be omitted when angle_file is set");
    stream->check_extent(S);
    E = stream->experts();
    angle_type = stream_type;
  } else {
    if (!angles.present) throw OpError("input angles is required (or the attribute angle_file)");
    if (!is_angle_type(angles.type))
      throw OpError(std::string("input angles must be float32, float16 or int8, got ") + type_name(angles.type));
    if (angles.shape.size() != 3) throw OpError("input angles must have rank 3 [E, S, P/2], got shape " + shape_str(angles.shape));
    if (angles.shape[0] < 1 || angles.shape[1] != static_cast<int64_t>(S) || angles.shape[2] != static_cast<int64_t>(P / 2))
      throw OpError("input angles must have shape [E >= 1, " + std::to_string(S) + ", " + std::to_string(P / 2) +
                    "] for D = " + std::to_string(D) + ", got " + shape_str(angles.shape));
    E = static_cast<size_t>(angles.shape[0]);
    angle_type = angles.type;
  }

  const int64_t* idx = nullptr;
  if (index.present) {
    if (index.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64)
      throw OpError(std::string("input expert_index must be int64, got ") + type_name(index.type));
    if (index.shape.size() != 1 || index.shape[0] != X.shape[0])
      throw OpError("input expert_index must have shape [M] = [" + std::to_string(M) + "], got " + shape_str(index.shape));
    idx = static_cast<const int64_t*>(index.data);
    for (size_t m = 0; m < M; ++m)
      if (idx[m] < 0 || idx[m] >= static_cast<int64_t>(E))
        throw OpError("input expert_index[" + std::to_string(m) + "] = " + std::to_string(idx[m]) +
                      " is out of range [0, " + std::to_string(E) + ")");
  } else if (E != 1) {
    throw OpError("input expert_index is omitted but angles has E = " + std::to_string(E) + " experts (must be 1)");
  }

  if (angle_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8) {
    if (!scale.present) throw OpError("input angle_scale is required when angles is int8");
    if (scale.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
      throw OpError(std::string("input angle_scale must be float32, got ") + type_name(scale.type));
    if (scale.shape.size() != 1 || scale.shape[0] != static_cast<int64_t>(E))
      throw OpError("input angle_scale must have shape [E] = [" + std::to_string(E) + "], got " + shape_str(scale.shape));
  } else if (scale.present) {
    throw OpError(std::string("input angle_scale must be omitted when angles is ") + type_name(angle_type));
  }

  float* Y = static_cast<float*>(output(api, ctx, 0, X.shape));
  if (M == 0) return;
  const float* x = static_cast<const float*>(X.data);
  if (stream) return compute_streamed(x, Y, M, D, S, idx, scale, ctx);
  const size_t tf = table_floats(S, P);

  // Table of each row's expert: the constant tables, or this call's referenced experts.
  const float* tables = const_tables.data();
  std::vector<float> call_tables;
  std::vector<size_t> slot(E, 0);
  if (const_tables.empty()) {
    std::vector<size_t> used;
    std::vector<bool> seen(E, false);
    for (size_t m = 0; m < M; ++m) {
      const size_t e = idx ? static_cast<size_t>(idx[m]) : 0;
      if (!seen[e]) seen[e] = true, slot[e] = used.size(), used.push_back(e);
    }
    call_tables.resize(used.size() * tf);
    auto build = [&](size_t u) { build_table(angles, scale, used[u], S, &call_tables[u * tf]); };
    parallel_for(api, ctx, used.size(), build);
    tables = call_tables.data();
  } else {
    for (size_t e = 0; e < E; ++e) slot[e] = e;
  }

  // Tasks of whole rows, each at least ~32K pair rotations.
  const size_t rows = std::max<size_t>(1, 32768 / (S * P / 2)), tasks = (M + rows - 1) / rows;
  auto task = [&](size_t t) {
    for (size_t m = t * rows; m < std::min(M, (t + 1) * rows); ++m) {
      std::copy(x + m * D, x + (m + 1) * D, Y + m * D);
      rotate(Y + m * D, D, S, tables + slot[idx ? static_cast<size_t>(idx[m]) : 0] * tf, transpose);
    }
  };
  parallel_for(api, ctx, tasks, task);
}

void Kernel::compute_streamed(const float* x, float* Y, size_t M, size_t D, size_t S, const int64_t* idx,
                              const Tensor& scale, OrtKernelContext* ctx) const {
  const size_t C = stream->slots(), P = size_t{1} << S;
  // Rows grouped by expert (a stable sort: memory independent of E): order[first[u] .. first[u+1])
  // are the rows of expert used[u].
  auto expert = [&](size_t m) { return idx ? static_cast<size_t>(idx[m]) : size_t{0}; };
  std::vector<size_t> order(M), used, first;
  for (size_t m = 0; m < M; ++m) order[m] = m;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return expert(a) < expert(b); });
  for (size_t r = 0; r < M; ++r)
    if (used.empty() || used.back() != expert(order[r])) used.push_back(expert(order[r])), first.push_back(r);
  first.push_back(M);

  const ONNXTensorElementDataType type = stream_type;
  const float* scales = scale.present ? static_cast<const float*>(scale.data) : nullptr;
  const size_t rows_per_task = std::max<size_t>(1, 32768 / (S * P / 2));
  // At most C experts' tables at a time: this call never needs more slots than the cache has.
  for (size_t g0 = 0; g0 < used.size(); g0 += C) {
    const size_t n = std::min(C, used.size() - g0);
    std::vector<AngleCache::Table> tables(n);
    std::vector<uint32_t> tags(n);
    std::vector<size_t> missing;
    for (size_t u = 0; u < n; ++u) {  // hits first (made most recent), then the misses
      const float sc = scales ? scales[used[g0 + u]] : 1.0f;
      std::memcpy(&tags[u], &sc, 4);
      tables[u] = stream->lookup(used[g0 + u], S, tags[u]);
      if (!tables[u]) missing.push_back(u);
    }
    std::vector<std::string> errors(missing.size());
    auto fetch = [&](size_t i) {  // read + cos/sin of the misses, in parallel
      const size_t u = missing[i];
      const float sc = scales ? scales[used[g0 + u]] : 1.0f;
      try {
        tables[u] = stream->load(used[g0 + u], S,
                                 [&](const void* raw, float* out) { build_stream_table(type, raw, sc, S, out); });
      } catch (const std::exception& ex) {  // parallel_for tasks must not throw
        errors[i] = ex.what();
      } catch (...) {
        errors[i] = "unknown error reading angles";
      }
    };
    if (!missing.empty()) parallel_for(api, ctx, missing.size(), fetch);
    for (const std::string& err : errors)
      if (!err.empty()) throw OpError(err);
    for (size_t u : missing) tables[u] = stream->insert(used[g0 + u], S, tags[u], tables[u]);  // in expert order

    // The group's rows are order[first[g0] .. first[g0 + n]).
    const size_t r0 = first[g0], r1 = first[g0 + n];
    std::vector<const float*> row_table(r1 - r0);
    for (size_t u = 0; u < n; ++u)
      for (size_t r = first[g0 + u]; r < first[g0 + u + 1]; ++r) row_table[r - r0] = tables[u]->data();
    const size_t tasks = (r1 - r0 + rows_per_task - 1) / rows_per_task;
    auto task = [&](size_t t) {
      for (size_t r = r0 + t * rows_per_task; r < std::min(r1, r0 + (t + 1) * rows_per_task); ++r) {
        const size_t m = order[r];
        std::copy(x + m * D, x + (m + 1) * D, Y + m * D);
        rotate(Y + m * D, D, S, row_table[r - r0], transpose);
      }
    };
    parallel_for(api, ctx, tasks, task);
  }
}

}  // namespace

constexpr const char* kStreamAttrs[] = {"angle_offset", "angle_file_size", "angle_experts", "angle_dtype",
                                        "cache_slots", "cache_key"};

std::shared_ptr<AngleCache> open_angle_stream(const OrtApi* api, const OrtKernelInfo* info, const SessionConfig& cfg,
                                              ONNXTensorElementDataType* type, bool required) {
  bool has_file = false;
  const std::string file = attr_string(api, info, "angle_file", "", &has_file);
  if (!has_file) {
    if (required) throw OpError("attribute angle_file is required");
    for (const char* a : kStreamAttrs) {
      bool found = false;
      if (std::string(a) == "cache_key") attr_string(api, info, a, "", &found);
      else attr_int(api, info, a, 0, &found);
      if (found) throw OpError(std::string("attribute ") + a + " is only allowed with angle_file");
    }
    return nullptr;
  }
  if (file.empty()) throw OpError("attribute angle_file must not be empty");
  bool has_e = false, has_t = false, has_c = false, has_s = false;
  const int64_t offset = attr_int(api, info, "angle_offset", 0);
  const int64_t size = attr_int(api, info, "angle_file_size", 0, &has_s);
  const int64_t E = attr_int(api, info, "angle_experts", 0, &has_e);
  const int64_t dtype = attr_int(api, info, "angle_dtype", 0, &has_t);
  const int64_t C = attr_int(api, info, "cache_slots", 0, &has_c);
  const std::string key = attr_string(api, info, "cache_key", "");
  if (offset < 0) throw OpError("attribute angle_offset must be >= 0, got " + std::to_string(offset));
  if (!has_s || size < 0)
    throw OpError("attribute angle_file_size is required with angle_file and must be >= 0" +
                  (has_s ? ", got " + std::to_string(size) : std::string()));
  if (!has_e || E < 1)
    throw OpError("attribute angle_experts is required with angle_file and must be >= 1" +
                  (has_e ? ", got " + std::to_string(E) : std::string()));
  if (!has_t) throw OpError("attribute angle_dtype is required with angle_file");
  *type = static_cast<ONNXTensorElementDataType>(dtype);
  if (dtype < 0 || dtype > 1000 || !is_angle_type(*type))
    throw OpError("attribute angle_dtype must be 1 (float32), 10 (float16) or 3 (int8), got " + std::to_string(dtype));
  if (!has_c || C < 1)
    throw OpError("attribute cache_slots is required with angle_file and must be >= 1" +
                  (has_c ? ", got " + std::to_string(C) : std::string()));
  AngleCache::Params p{cfg.model_dir, file, offset, static_cast<uint64_t>(size), static_cast<size_t>(E),
                       angle_bytes(*type), static_cast<size_t>(std::min(C, E))};  // more slots than experts: no use
  return AngleCache::shared(key, p);
}

void build_stream_table(ONNXTensorElementDataType type, const void* raw, float scale, size_t S, float* out) {
  Tensor a, s;
  a.type = type;
  a.data = raw;
  s.data = &scale;
  build_table(a, s, 0, S, out);
}

const OpDef kButterflyRotateDef = {
    "ButterflyRotate", 4, 1,
    [](const OrtApi* api, const OrtKernelInfo* info, const SessionConfig& cfg, void** k) {
      return guarded(api, "ButterflyRotate", [&] { *k = create(api, info, cfg); });
    },
    [](void* k, OrtKernelContext* ctx) {
      auto* kernel = static_cast<Kernel*>(k);
      return guarded(kernel->api, "ButterflyRotate", [&] { kernel->compute(ctx); });
    },
    [](void* k) { delete static_cast<Kernel*>(k); },
};

}  // namespace bmoe
