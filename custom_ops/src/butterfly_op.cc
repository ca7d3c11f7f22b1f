// ButterflyRotate operator: validation (docs/ops.md), cos/sin tables, and rows
// spread over ORT's intra-op thread pool.
//
// cos/sin tables (resident form): built per call from the angles, only for the experts
// that call references, at most kCallExperts at a time, into a buffer of the calling
// thread. No per-expert state: memory does not grow with E beyond the angles (keeping
// every expert's fp32 tables cost ~5.5x the fp16 angles), and Run needs no cache or lock.
// The sincos cost (S·P/2 per expert) is measured in docs/benchmarks.md (issue 16, part 2).
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
#include "sincos.h"

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

// One expert's cos/sin table (butterfly.h layout) from its stored angles (docs/ops.md dequantisation),
// in blocks of kBlock angles: widen/scale, vectorised sincos, then place.
void build_table(ONNXTensorElementDataType type, const void* raw, float scale, size_t S, float* out) {
  constexpr size_t kBlock = 256;
  alignas(64) float th[kBlock], cs[kBlock], sn[kBlock];
  const size_t P = size_t{1} << S;
  for (size_t s = 0; s < S; ++s) {
    const size_t h = size_t{1} << s;
    float* c = out + stage_offset(s, P);
    for (size_t k0 = 0; k0 < P / 2; k0 += kBlock) {
      const size_t n = std::min(kBlock, P / 2 - k0), i0 = s * P / 2 + k0;
      if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
        std::memcpy(th, static_cast<const float*>(raw) + i0, n * 4);
      } else if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16) {
        half_to_float_block(static_cast<const uint16_t*>(raw) + i0, n, th);
      } else {
        const int8_t* q = static_cast<const int8_t*>(raw) + i0;
        for (size_t i = 0; i < n; ++i) th[i] = static_cast<float>(q[i]) * scale;
      }
      if (h >= kChunk) {  // per pair: straight into the table
        sincos_block(th, n, c + k0, c + P / 2 + k0);
        continue;
      }
      sincos_block(th, n, cs, sn);
      for (size_t i = 0; i < n; ++i) {
        const size_t k = k0 + i, j = (k >> s) << (s + 1) | (k & (h - 1));
        c[j] = c[j + h] = cs[i];
        c[P + j] = -sn[i];
        c[P + j + h] = sn[i];
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

// Experts whose cos/sin tables a resident call holds at once: the call's table memory is bounded
// (planner.py CALL_TABLE_EXPERTS) and, at decode, the top-k experts' tables are built in parallel.
constexpr size_t kCallExperts = 8;

struct Kernel {
  const OrtApi* api;
  bool transpose;
  RotateFn rotate;
  std::shared_ptr<AngleCache> stream;  // streamed form, else null (shared by cache_key)
  ONNXTensorElementDataType stream_type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;

  void compute(OrtKernelContext* ctx) const;
  // Rows grouped by expert, at most `group` experts at a time; tables(experts, n, out) points
  // out[u] at the table of experts[u], valid until its next call.
  template <class Tables>
  void rotate_grouped(const float* x, float* Y, size_t M, size_t D, size_t S, const int64_t* idx, size_t group,
                      OrtKernelContext* ctx, Tables&& tables) const;
  void stream_tables(const size_t* experts, size_t n, size_t S, const float* scales, OrtKernelContext* ctx,
                     std::vector<AngleCache::Table>& held, const float** out) const;
};

Kernel* create(const OrtApi* api, const OrtKernelInfo* info, const SessionConfig& cfg) {
  const int64_t t = attr_int(api, info, "transpose", 0);
  if (t != 0 && t != 1) throw OpError("attribute transpose must be 0 or 1, got " + std::to_string(t));
  std::unique_ptr<Kernel> k(new Kernel{api, t == 1, rotate_for(select_variant()), nullptr});
  k->stream = open_angle_stream(api, info, cfg, &k->stream_type, false);
  if (k->stream && constant_input(api, info, 1).present)
    throw OpError("input angles must be omitted when angle_file is set");
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
  const float* scales = scale.present ? static_cast<const float*>(scale.data) : nullptr;
  if (stream) {
    std::vector<AngleCache::Table> held;
    return rotate_grouped(x, Y, M, D, S, idx, stream->slots(), ctx, [&](const size_t* ex, size_t n, const float** out) {
      stream_tables(ex, n, S, scales, ctx, held, out);
    });
  }
  // Resident: the tables of this call's experts, computed from the angles (no per-expert state).
  const size_t tf = table_floats(S, P), slice = S * P / 2 * angle_bytes(angle_type);
  // Reused across calls (a fresh block each call would be mmap'ed and page-faulted every time).
  thread_local std::vector<float> buf;
  rotate_grouped(x, Y, M, D, S, idx, kCallExperts, ctx, [&](const size_t* ex, size_t n, const float** out) {
    if (buf.size() < n * tf) buf.resize(n * tf);
    float* tables = buf.data();  // this thread's buffer: the pool's threads have their own `buf`
    auto build = [&](size_t u) {
      build_table(angle_type, static_cast<const unsigned char*>(angles.data) + ex[u] * slice,
                  scales ? scales[ex[u]] : 1.f, S, tables + u * tf);
    };
    parallel_for(api, ctx, n, build);
    for (size_t u = 0; u < n; ++u) out[u] = tables + u * tf;
  });
}

template <class Tables>
void Kernel::rotate_grouped(const float* x, float* Y, size_t M, size_t D, size_t S, const int64_t* idx, size_t group,
                            OrtKernelContext* ctx, Tables&& tables) const {
  const size_t P = size_t{1} << S;
  // Rows grouped by expert (a stable sort: memory independent of E): order[first[u] .. first[u+1])
  // are the rows of expert used[u].
  auto expert = [&](size_t m) { return idx ? static_cast<size_t>(idx[m]) : size_t{0}; };
  std::vector<size_t> order(M), used, first;
  for (size_t m = 0; m < M; ++m) order[m] = m;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return expert(a) < expert(b); });
  for (size_t r = 0; r < M; ++r)
    if (used.empty() || used.back() != expert(order[r])) used.push_back(expert(order[r])), first.push_back(r);
  first.push_back(M);

  // Tasks of whole rows, each at least ~32K pair rotations.
  const size_t rows_per_task = std::max<size_t>(1, 32768 / (S * P / 2));
  std::vector<const float*> tab(group), row_table;
  for (size_t g0 = 0; g0 < used.size(); g0 += group) {
    const size_t n = std::min(group, used.size() - g0);
    tables(&used[g0], n, tab.data());
    // The group's rows are order[first[g0] .. first[g0 + n]).
    const size_t r0 = first[g0], r1 = first[g0 + n];
    row_table.resize(r1 - r0);
    for (size_t u = 0; u < n; ++u)
      for (size_t r = first[g0 + u]; r < first[g0 + u + 1]; ++r) row_table[r - r0] = tab[u];
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

// Streamed form: the group's tables from the cache (hits first, made most recent), the misses
// read and built in parallel, then inserted in expert order (deterministic LRU order).
void Kernel::stream_tables(const size_t* experts, size_t n, size_t S, const float* scales, OrtKernelContext* ctx,
                           std::vector<AngleCache::Table>& held, const float** out) const {
  held.assign(n, nullptr);
  std::vector<uint32_t> tags(n);
  std::vector<size_t> missing;
  for (size_t u = 0; u < n; ++u) {
    const float sc = scales ? scales[experts[u]] : 1.0f;
    std::memcpy(&tags[u], &sc, 4);
    held[u] = stream->lookup(experts[u], S, tags[u]);
    if (!held[u]) missing.push_back(u);
  }
  std::vector<std::string> errors(missing.size());
  const ONNXTensorElementDataType type = stream_type;
  auto fetch = [&](size_t i) {
    const size_t u = missing[i];
    const float sc = scales ? scales[experts[u]] : 1.0f;
    try {
      held[u] = stream->load(experts[u], S, [&](const void* raw, float* t) { build_table(type, raw, sc, S, t); });
    } catch (const std::exception& ex) {  // parallel_for tasks must not throw
      errors[i] = ex.what();
    } catch (...) {
      errors[i] = "unknown error reading angles";
    }
  };
  if (!missing.empty()) parallel_for(api, ctx, missing.size(), fetch);
  for (const std::string& err : errors)
    if (!err.empty()) throw OpError(err);
  for (size_t u : missing) held[u] = stream->insert(experts[u], S, tags[u], held[u]);
  for (size_t u = 0; u < n; ++u) out[u] = held[u]->data();
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
  build_table(type, raw, scale, S, out);
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
