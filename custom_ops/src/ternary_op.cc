// TernaryMatMul operator: validation (docs/ops.md), activation preparation,
// base3 → 2-bit conversion, and tiling over ORT's intra-op thread pool.
#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "cpu.h"
#include "huge_pages.h"
#include "op_def.h"
#include "ort_glue.h"
#include "ternary.h"

namespace bmoe {
namespace {

using namespace ternary;

Kernels kernels_for(Variant v) {
  switch (v) {
#if defined(__x86_64__) || defined(__i386__)
    case Variant::Avx2: return {f32_avx2, i8_avx2, nullptr, nullptr, abs_max_scalar, quantize_range_scalar, nullptr};
    case Variant::Avx512: {
      const bool vnni = cpu_features().avx512vnni;
      return {f32_avx512, vnni ? i8_avx512vnni : i8_avx512, lut_tables_avx512, lut_avx512, abs_max_avx512,
              quantize_range_avx512,
              vnni ? i8_digits_avx512vnni : nullptr};
    }
#endif
#if defined(__aarch64__)
    case Variant::Neon: return {f32_neon, i8_neon, nullptr, nullptr, abs_max_scalar, quantize_range_scalar, nullptr};
    case Variant::Dotprod: return {f32_neon, i8_dotprod, nullptr, nullptr, abs_max_scalar, quantize_range_scalar, nullptr};
#endif
    default: return {f32_scalar, i8_scalar, lut_tables_scalar, lut_scalar, abs_max_scalar,
                     quantize_range_scalar, i8_digits_scalar};
  }
}

// base3 byte → its five trits as 2-bit codes (bits 2i, 2i+1 = trit i); 0xFFFF marks > 242.
struct Base3Table {
  uint16_t v[256];
  Base3Table() {
    for (int b = 0; b < 256; ++b) {
      uint16_t codes = 0;
      for (int i = 0, x = b; i < 5; ++i, x /= 3) codes |= static_cast<uint16_t>((x % 3 == 2 ? 1 : x % 3 == 0 ? 2 : 0) << (2 * i));
      v[b] = b > 242 ? 0xFFFF : codes;
    }
  }
};

// Re-packs one base3 row (Kb3 bytes) as a 2-bit row (Kb2 bytes). Returns false on a byte > 242.
bool base3_to_2bit(const uint8_t* in, size_t Kb3, uint8_t* out, size_t Kb2) {
  static const Base3Table table;
  uint64_t bits = 0;
  unsigned nbits = 0, bad = 0;
  size_t o = 0;
  for (size_t i = 0; i < Kb3; ++i) {
    const uint16_t codes = table.v[in[i]];
    bad |= codes == 0xFFFF;
    bits |= static_cast<uint64_t>(codes & 0x3FF) << nbits;
    for (nbits += 10; nbits >= 8 && o < Kb2; nbits -= 8, bits >>= 8) out[o++] = static_cast<uint8_t>(bits);
  }
  for (; o < Kb2; bits >>= 8) out[o++] = static_cast<uint8_t>(bits);  // remaining trits are padding (00)
  return bad == 0;
}

// The first 64-byte-aligned float of a buffer allocated with 16 floats to spare (the AVX-512 kernels' tables).
float* align64(float* p) { return p + (16 - reinterpret_cast<uintptr_t>(p) / sizeof(float) % 16) % 16; }

// A constant W repacked at kernel creation in the LUT layout (ternary.h).
struct LutWeights {
  size_t N = 0, J = 0, G = 0;
  HugeVector<uint32_t> w;  // G·J·16 words, block after block
  bool bad = false;        // an invalid code anywhere in W (reported by every Run)
};

// Largest M for which the LUT path is used (it costs one full pass over W per row of A).
constexpr size_t kLutMaxM = 4;

// Repacks 2-bit rows (N × Kb2 bytes, K trits each). Flags a code 11 anywhere, padding included.
void lut_repack(const uint8_t* w2, size_t N, size_t Kb2, size_t K, LutWeights& L) {
  L.N = N;
  L.J = lut_cols(K);
  L.G = lut_groups(N);
  L.w.assign(L.G * L.J * kLutRows, 0);
  // Digits d = t + 1 of the four trits of every byte value (code 11, flagged below, reads as 1).
  static const auto digits = [] {
    std::array<std::array<uint8_t, 4>, 256> t{};
    for (int b = 0; b < 256; ++b)
      for (int i = 0; i < 4; ++i) {
        const int code = (b >> (2 * i)) & 3;
        t[b][i] = static_cast<uint8_t>(code == 1 ? 2 : code == 2 ? 0 : 1);
      }
    return t;
  }();
  std::vector<uint8_t> d(std::max(4 * Kb2, kLutK * L.J), 1);  // one row's digits; 1 (a zero trit) past K
  unsigned bad = 0;
  for (size_t n = 0; n < L.G * kLutRows; ++n) {
    if (n < N) {
      const uint8_t* row = w2 + n * Kb2;
      for (size_t b = 0; b < Kb2; ++b) {
        bad |= row[b] & (row[b] >> 1) & 0x55u;
        std::memcpy(&d[4 * b], digits[row[b]].data(), 4);
      }
      std::fill(d.begin() + static_cast<std::ptrdiff_t>(K), d.end(), uint8_t{1});
    } else if (n == N) {
      std::fill(d.begin(), d.end(), uint8_t{1});
    }
    for (size_t j = 0; j < L.J; ++j) {
      const uint8_t* x = &d[kLutK * j];
      uint32_t word = 0;
      for (size_t s = 0; s < 6; ++s)
        word |= static_cast<uint32_t>(x[3 * s] + 3 * x[3 * s + 1] + 9 * x[3 * s + 2]) << (5 * s);
      L.w[lut_word(L.J, L.G, j / kLutJb, n / kLutRows, j % kLutJb, n % kLutRows)] = word;
    }
  }
  L.bad = bad != 0;
}

// A constant W repacked at kernel creation as digit rows (ternary.h), for act_quant at small M.
struct DigitWeights {
  HugeVector<uint8_t> d;  // N · digit_row_bytes(K)
  bool bad = false;       // an invalid code anywhere in W
};

// Repacks 2-bit rows (N × Kb2 bytes, K trits each). Flags a code 11 anywhere, padding included.
void digits_repack(const uint8_t* w2, size_t N, size_t Kb2, size_t K, DigitWeights& D) {
  static const auto to_digits = [] {  // each 2-bit code c of a byte → its digit (00→1, 01→2, 10→0; 11 flagged)
    std::array<uint8_t, 256> t{};
    for (int b = 0; b < 256; ++b)
      for (int i = 0; i < 4; ++i) {
        const int code = (b >> (2 * i)) & 3;
        t[b] = static_cast<uint8_t>(t[b] | (code == 1 ? 2 : code == 2 ? 0 : 1) << (2 * i));
      }
    return t;
  }();
  const size_t Kd = digit_row_bytes(K);
  D.d.assign(N * Kd, 0);
  unsigned bad = 0;
  for (size_t n = 0; n < N; ++n)
    for (size_t b = 0; b < Kb2; ++b) {
      const uint8_t x = w2[n * Kb2 + b];
      bad |= x & (x >> 1) & 0x55u;
      D.d[n * Kd + b] = to_digits[x];
    }
  D.bad = bad != 0;
}

// The start of a run of weights a thread is about to stream, requested at once (into L2): the kernels prefetch a
// fixed distance ahead of their loads (8-12 KiB), so without this a run's first bytes arrive one miss at a time.
constexpr size_t kRunPrefetch = 12288;
inline void prefetch_run(const void* p, size_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (size_t i = 0; i < std::min(bytes, kRunPrefetch); i += 64) __builtin_prefetch(c + i, 0, 2);
}

// Y = scale · Σ_b P_b on the LUT layout, for M ≤ kLutMaxM rows of A. Work items are the layout's items
// (ternary.h: 4 groups of one K block, 8 KiB of weights at full width; fine enough that the last ones balance the
// threads), in memory order. The op's tasks claim runs of them (ort_glue.h) and build a block's tables (24 KiB a
// row of A, in L1) when a run enters that block, so each thread reads one sequential stream of weights and only
// the tables of the blocks it works on (no table shared between threads, no wait before the products). Each item
// writes its rows' partial sums P_b and counts itself done for its rows; the item that completes a row range (its
// B-th) adds that range's P_b over b in increasing order into Y. So no thread waits for another (no barrier between
// products and sums), and the result does not depend on the thread count or on which thread adds.
struct LutProduct {
  static constexpr size_t kTableFloats = 6 * kLutJb * 32;
  const Kernels& kern;
  const LutWeights& lut;
  size_t M;
  const float* scale;
  float* Y;       // M × N
  float* xa;      // A zero-padded to 18·J per row
  float* part;    // P[b][m][G·16]
  uint32_t* done; // per item column (lut_items(G)): blocks done (done_words() of them, zeroed here)

  size_t items() const { return lut_blocks(lut.J) * lut_items(lut.G); }
  // Floats of scratch for xa and part (plus 16 for alignment).
  static size_t scratch(const LutWeights& L, size_t M) {
    return M * kLutK * L.J + lut_blocks(L.J) * M * L.G * kLutRows + 16;
  }
  static size_t done_words(const LutWeights& L) { return lut_items(L.G); }
  LutProduct(const Kernels& k, const LutWeights& L, const float* a, size_t K, size_t m, const float* sc, float* y,
             float* buf, uint32_t* counts)
      : kern(k), lut(L), M(m), scale(sc), Y(y), done(counts) {
    const size_t kl = kLutK * L.J;
    xa = align64(buf);
    part = xa + M * kl;
    std::fill(done, done + done_words(L), 0u);
    for (size_t r = 0; r < M; ++r) {
      std::copy(a + r * K, a + (r + 1) * K, xa + r * kl);
      std::fill(xa + r * kl + K, xa + (r + 1) * kl, 0.f);
    }
  }

  // Items [i0, i1). fresh: the run does not continue this thread's previous one (its start is not being
  // prefetched yet). tab: M · kTableFloats floats, 64-byte aligned; *tab_block: the block whose tables it holds
  // for this product (SIZE_MAX: none).
  void run(size_t i0, size_t i1, bool fresh, float* tab, size_t* tab_block) const {
    const size_t items_b = lut_items(lut.G), rows = lut.G * kLutRows, kl = kLutK * lut.J;
    const uint32_t B = static_cast<uint32_t>(lut_blocks(lut.J));
    if (fresh) prefetch_run(item_words(i0), (item_words(i1) - item_words(i0)) * 4);
    for (size_t i = i0; i < i1; ++i) {
      const size_t b = i / items_b, g0 = i % items_b * kLutItem, ng = std::min(kLutItem, lut.G - g0);
      const size_t w = lut_width(lut.J, b);
      if (*tab_block != b) {
        for (size_t m = 0; m < M; ++m) kern.lut_tables(xa + m * kl + kLutK * kLutJb * b, w, tab + m * kTableFloats);
        *tab_block = b;
      }
      const uint32_t* Wi = item_words(i);
      for (size_t m = 0; m < M; ++m)
        kern.lut(tab + m * kTableFloats, w, Wi, ng, part + (b * M + m) * rows + g0 * kLutRows);
    }
    // The run's items counted done only now: a locked add is a full fence (it waits for every load in flight), and
    // one after each item stalled the weight stream there (77 % of parallel_claim's samples, ~11 % of all, at 8
    // threads on the host). acq_rel: the adder sees every block's P of its rows, each written before its count.
    for (size_t i = i0; i < i1; ++i) {
      const size_t c = i % items_b;
      if (__atomic_add_fetch(&done[c], 1u, __ATOMIC_ACQ_REL) == B) sum(c);
    }
  }

 private:
  // Item i's first word (items() past the last: the end of the layout).
  const uint32_t* item_words(size_t i) const {
    const size_t items_b = lut_items(lut.G), b = i / items_b;
    if (b >= lut_blocks(lut.J)) return lut.w.data() + lut.w.size();
    return lut.w.data() + lut_word(lut.J, lut.G, b, i % items_b * kLutItem, 0, 0);
  }
  // Y for the rows of item column c (groups c·kLutItem …), all B blocks' P present.
  void sum(size_t c) const {
    const size_t N = lut.N, B = lut_blocks(lut.J), rows = lut.G * kLutRows;
    const size_t n0 = c * kLutItem * kLutRows, nc = std::min(N, n0 + kLutItem * kLutRows) - n0;
    float acc[kLutItem * kLutRows];
    for (size_t m = 0; m < M; ++m) {
      std::copy(part + m * rows + n0, part + m * rows + n0 + nc, acc);
      for (size_t b = 1; b < B; ++b) {
        const float* p = part + (b * M + m) * rows + n0;
        for (size_t n = 0; n < nc; ++n) acc[n] += p[n];
      }
      for (size_t n = 0; n < nc; ++n) Y[m * N + n0 + n] = scale[n0 + n] * acc[n];
    }
  }
};

// ---- Kernel choice by measurement. Per mode (exact / act_quant) the variants this CPU runs are timed once per
// process on a synthetic decode product (M=1, K=4096, N=256: 256 KiB of weights, in L2; well under 50 ms in all)
// and the fastest is used; scalar, the reference, is a candidate only when it is the only one. The variants of a
// mode give the same results within the spec (act_quant: bit-identical). BMOE_KERNEL forces one variant;
// BMOE_CALIBRATE=0 skips the timing and takes the best by CPU features.
double time_decode(const Kernels& kern, bool act_quant) {
  constexpr size_t K = 4096, N = 256, Kb = K / 4;
  std::vector<uint8_t> w(N * Kb);
  uint32_t x = 12345;
  for (auto& b : w) {  // codes 00, 01, 10 only
    uint8_t v = 0;
    for (int i = 0; i < 4; ++i) x = x * 1664525u + 1013904223u, v |= static_cast<uint8_t>(((x >> 24) % 3) << (2 * i));
    b = v;
  }
  std::vector<float> a(K), y(N), scale(N, 1.f);
  for (size_t k = 0; k < K; ++k) a[k] = static_cast<float>(static_cast<int>(k % 17) - 8);
  // The path a decode product takes with a constant W: LUT layout (exact) or digit rows (act_quant), where the
  // variant has it, else the 2-bit rows.
  LutWeights lut;
  DigitWeights digits;
  std::vector<float> buf, tabs(LutProduct::kTableFloats + 16);
  std::vector<int8_t> q(K);
  std::vector<uint32_t> counts;
  if (!act_quant && kern.lut) {
    lut_repack(w.data(), N, Kb, K, lut);
    buf.resize(LutProduct::scratch(lut, 1));
    counts.resize(LutProduct::done_words(lut));
  }
  if (act_quant && kern.i8_digits) digits_repack(w.data(), N, Kb, K, digits);
  float* tab = align64(tabs.data());
  auto product = [&] {
    if (!act_quant && kern.lut) {
      const LutProduct p(kern, lut, a.data(), K, 1, scale.data(), y.data(), buf.data(), counts.data());
      size_t tab_block = SIZE_MAX;
      p.run(0, p.items(), true, tab, &tab_block);
    } else if (act_quant) {
      const float qs = kern.abs_max(a.data(), K) / 127.f;  // a is not all zero
      const int32_t qsum = kern.quantize_range(a.data(), 0, K, K, qs, q.data());
      if (kern.i8_digits) kern.i8_digits(q.data(), &qs, &qsum, 1, K, digits.d.data(), N, scale.data(), y.data(), N);
      else kern.i8(q.data(), &qs, &qsum, 1, K, w.data(), Kb, N, scale.data(), y.data(), N);
    } else {
      kern.f32(a.data(), 1, K, w.data(), Kb, N, scale.data(), y.data(), N);
    }
  };
  product();  // warm caches
  double best = 1e30;
  for (int r = 0; r < 7; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    product();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

Variant fastest_variant(bool act_quant) {
  const char* env = std::getenv("BMOE_CALIBRATE");
  if (env && std::strcmp(env, "0") == 0) return select_variant();
  Variant pick = Variant::Scalar;
  double best = 1e30;
  for (Variant v : {Variant::Avx2, Variant::Avx512, Variant::Neon, Variant::Dotprod}) {
    if (!variant_available(v)) continue;
    const double t = time_decode(kernels_for(v), act_quant);
    if (t < best) best = t, pick = v;
  }
  return pick;
}

// The variant for a new kernel of this mode: BMOE_KERNEL if set, else the calibrated one (cached per process).
Variant ternary_variant(bool act_quant) {
  const char* forced = std::getenv("BMOE_KERNEL");
  if (forced && *forced) return select_variant();
  static const Variant exact = fastest_variant(false), quant = fastest_variant(true);
  return act_quant ? quant : exact;
}

// Largest K: act_quant's int32 sums of K products |q·t| <= 127 stay exact (127 · 2^24 < 2^31),
// and every size derived from K stays far from overflow.
constexpr int64_t kMaxK = int64_t{1} << 24;

struct Kernel {
  const OrtApi* api;
  int64_t K;
  bool base3;
  bool act_quant;
  Kernels kern;
  std::unique_ptr<LutWeights> lut;       // constant W in the LUT layout (exact), when the variant has a LUT path
  std::unique_ptr<DigitWeights> digits;  // constant W as digit rows (act_quant), when the variant has that path
  mutable std::atomic<size_t> threads{1};  // the most threads a call has seen: the next calls' share count

  void compute(OrtKernelContext* ctx) const;
};

// Bytes per packed row of K trits: ceil(K/5) or ceil(K/4), without overflow for any K >= 0.
int64_t packed_row_bytes(int64_t K, bool base3) { return base3 ? K / 5 + (K % 5 != 0) : K / 4 + (K % 4 != 0); }

Kernel* create(const OrtApi* api, const OrtKernelInfo* info) {
  bool has_k = false;
  const int64_t K = attr_int(api, info, "K", 0, &has_k);
  if (!has_k) throw OpError("attribute K is required");
  if (K < 1 || K > kMaxK)
    throw OpError("attribute K must be in [1, " + std::to_string(kMaxK) + "], got " + std::to_string(K));
  const std::string packing = attr_string(api, info, "packing", "2bit");
  if (packing != "2bit" && packing != "base3")
    throw OpError("attribute packing must be \"2bit\" or \"base3\", got \"" + packing + "\"");
  const int64_t aq = attr_int(api, info, "act_quant", 0);
  if (aq != 0 && aq != 1) throw OpError("attribute act_quant must be 0 or 1, got " + std::to_string(aq));
  std::unique_ptr<Kernel> kernel(
      new Kernel{api, K, packing == "base3", aq == 1, kernels_for(ternary_variant(aq == 1)), nullptr, nullptr});
  // Constant, well-formed W (anything else is reported by compute): repack once for the LUT or digit-row path.
  const Tensor W = constant_input(api, info, 1);
  const int64_t Kb = packed_row_bytes(K, packing == "base3");
  const bool repack = aq == 1 ? kernel->kern.i8_digits != nullptr : kernel->kern.lut != nullptr;
  if (repack && W.present && W.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 && W.shape.size() == 2 &&
      W.shape[0] >= 1 && W.shape[1] == Kb) {
    const size_t N = static_cast<size_t>(W.shape[0]), k = static_cast<size_t>(K), Kb2 = (k + 3) / 4;
    const uint8_t* w2 = static_cast<const uint8_t*>(W.data);
    std::vector<uint8_t> rows;
    bool bad3 = false;
    if (packing == "base3") {
      rows.resize(N * Kb2);
      for (size_t n = 0; n < N; ++n)
        if (!base3_to_2bit(w2 + n * Kb, static_cast<size_t>(Kb), &rows[n * Kb2], Kb2)) bad3 = true;
      w2 = rows.data();
    }
    if (aq == 1) {
      kernel->digits.reset(new DigitWeights);
      digits_repack(w2, N, Kb2, k, *kernel->digits);
      kernel->digits->bad |= bad3;
    } else {
      kernel->lut.reset(new LutWeights);
      lut_repack(w2, N, Kb2, k, *kernel->lut);
      kernel->lut->bad |= bad3;
    }
  }
  return kernel.release();
}

void Kernel::compute(OrtKernelContext* ctx) const {
  const Tensor A = input(api, ctx, 0), W = input(api, ctx, 1), scale = input(api, ctx, 2);
  const std::string packing = base3 ? "base3" : "2bit";
  if (A.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) throw OpError(std::string("input A must be float32, got ") + type_name(A.type));
  if (A.shape.size() != 2) throw OpError("input A must have rank 2 [M, K], got shape " + shape_str(A.shape));
  if (A.shape[1] != K)
    throw OpError("input A has " + std::to_string(A.shape[1]) + " columns but attribute K = " + std::to_string(K));
  if (W.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8)
    throw OpError(std::string("input W_packed must be uint8, got ") + type_name(W.type));
  if (W.shape.size() != 2) throw OpError("input W_packed must have rank 2 [N, Kb], got shape " + shape_str(W.shape));
  const int64_t Kb = packed_row_bytes(K, base3);
  if (W.shape[0] < 1) throw OpError("input W_packed must have N >= 1 rows, got shape " + shape_str(W.shape));
  if (W.shape[1] != Kb)
    throw OpError("input W_packed has " + std::to_string(W.shape[1]) + " bytes per row, expected " + std::to_string(Kb) +
                  " for K = " + std::to_string(K) + " (" + packing + " packing)");
  if (scale.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
    throw OpError(std::string("input scale must be float32, got ") + type_name(scale.type));
  if (scale.shape.size() != 1 || scale.shape[0] != W.shape[0])
    throw OpError("input scale must have shape [N] = [" + std::to_string(W.shape[0]) + "], got " + shape_str(scale.shape));

  const size_t M = static_cast<size_t>(A.shape[0]), N = static_cast<size_t>(W.shape[0]), k = static_cast<size_t>(K);
  const size_t Kb2 = (k + 3) / 4, chunk = act_quant ? kQChunk : kChunk, Kp = (k + chunk - 1) / chunk * chunk;
  float* Y = static_cast<float*>(output(api, ctx, 0, {A.shape[0], W.shape[0]}));
  const float* a = static_cast<const float*>(A.data);
  const float* sc = static_cast<const float*>(scale.data);
  std::atomic<bool> bad{false};
  const char* bad_msg = base3 ? "input W_packed contains an invalid base3 byte (> 242)"
                              : "input W_packed contains an invalid 2-bit trit code (11)";

  // Small M, constant W: table lookups on the repacked weights (exact fp32).
  if (lut && !act_quant && M <= kLutMaxM) {
    if (lut->bad) throw OpError(bad_msg);
    if (M == 0) return;
    // Per-thread scratch reused across calls (a fresh block per call would be mmap'ed and page-faulted every
    // time). Only this call's tasks use the caller's, through `p`, and the caller waits for them.
    thread_local std::vector<float> scratch;
    thread_local std::vector<uint32_t> counts;
    if (scratch.size() < LutProduct::scratch(*lut, M)) scratch.resize(LutProduct::scratch(*lut, M));
    if (counts.size() < LutProduct::done_words(*lut)) counts.resize(LutProduct::done_words(*lut));
    const LutProduct p(kern, *lut, a, k, M, sc, Y, scratch.data(), counts.data());
    static std::atomic<uint64_t> calls{0};
    const uint64_t call = ++calls;
    auto run = [&](size_t i0, size_t i1, bool fresh) {
      thread_local struct {  // this thread's tables: of block `b` in call `call` (a stale pair never matches)
        uint64_t call = 0;
        size_t b = SIZE_MAX;
        std::vector<float> buf = std::vector<float>(kLutMaxM * LutProduct::kTableFloats + 16);
      } t;
      if (t.call != call) t.call = call, t.b = SIZE_MAX;
      p.run(i0, i1, fresh, align64(t.buf.data()), &t.b);
    };
    parallel_claim(api, ctx, threads, p.items(), run);
    return;
  }

  // Small M, constant W, act_quant: digit rows. Otherwise the weights as 2-bit rows (base3, a storage format, is
  // re-packed once per call).
  const bool use_digits = digits && M <= kDigitsMaxM;
  if (use_digits && digits->bad) throw OpError(bad_msg);
  const uint8_t* w2 = static_cast<const uint8_t*>(W.data);
  std::vector<uint8_t> repacked;
  if (base3 && !use_digits) {
    repacked.resize(N * Kb2);
    const size_t rows = 64, tasks = (N + rows - 1) / rows;
    auto task = [&](size_t t) {
      for (size_t n = t * rows; n < std::min(N, (t + 1) * rows); ++n)
        if (!base3_to_2bit(static_cast<const uint8_t*>(W.data) + n * Kb, Kb, &repacked[n * Kb2], Kb2)) bad = true;
    };
    parallel_for(api, ctx, tasks, task);
    w2 = repacked.data();
  }

  // Activations padded with zeros to Kp (f32), or quantized to int8 in qpos order. Per-thread scratch reused
  // across calls (as the LUT path's): only this call's tasks read it, and the calling thread waits for them.
  // (A thread_local is not captured by the tasks' lambdas: they use the pointers taken here.)
  thread_local std::vector<float> apad_buf, qscale_buf;
  thread_local std::vector<int8_t> q_buf;
  thread_local std::vector<int32_t> qsum_buf;
  int8_t* q = nullptr;
  float* qscale = nullptr;
  int32_t* qsum = nullptr;
  const size_t ranges = (Kp + kQuantRange - 1) / kQuantRange;  // act_quant: quantization items per row of A
  if (act_quant) {
    if (q_buf.size() < M * Kp) q_buf.resize(M * Kp);
    if (qscale_buf.size() < M) qscale_buf.resize(M), qsum_buf.resize(M);
    q = q_buf.data(), qscale = qscale_buf.data(), qsum = qsum_buf.data();
    for (size_t m = 0; m < M; ++m) {
      const float amax = kern.abs_max(a + m * k, k);
      qscale[m] = amax > 0.f ? amax / 127.f : 0.f;
      qsum[m] = 0;
      if (qscale[m] == 0.f) std::fill(q + m * Kp, q + (m + 1) * Kp, int8_t{0});  // all-zero row: Y row is 0
    }
  } else if (Kp != k) {
    if (apad_buf.size() < M * Kp) apad_buf.resize(M * Kp);
    float* apad = apad_buf.data();
    for (size_t m = 0; m < M; ++m) {
      std::copy(a + m * k, a + (m + 1) * k, apad + m * Kp);
      std::fill(apad + m * Kp + k, apad + (m + 1) * Kp, 0.f);
    }
    a = apad;
  }
  // act_quant: the rows of A are quantized by the tasks (a range of kQuantRange activations an item) before the
  // products; at 8 threads one thread quantizing a 14336-wide row took ~3-4 % of a decode product.
  auto quantize = [&](size_t i0, size_t i1) {
    for (size_t i = i0; i < i1; ++i) {
      const size_t m = i / ranges, k0 = i % ranges * kQuantRange;
      if (qscale[m] == 0.f) continue;
      const int32_t part = kern.quantize_range(a + m * k, k0, std::min(Kp, k0 + kQuantRange), k, qscale[m], q + m * Kp);
      __atomic_fetch_add(&qsum[m], part, __ATOMIC_RELAXED);
    }
  };

  if (M > 0) {
    // Tiles of up to 64 rows of A × NB rows of W (a contiguous slab of W); NB keeps a tile ≥ ~64K MACs and gives
    // ≤ ~64 column tiles. Digit rows (M ≤ 7: one row tile): tiles of 8 rows, and a claimed run of them is one call
    // over its rows, one sequential stream; the last runs are 8 rows, so the threads finish within ~1 µs.
    const size_t MB = std::min<size_t>(M, 64);
    const size_t min_nb = (65536 / (MB * Kp) + 7) / 8 * 8;
    size_t NB = use_digits ? 8 : std::max<size_t>({8, min_nb, (N + 63) / 64});
    if (M >= 3 && !use_digits) NB = (NB + 31) / 32 * 32;  // whole 32-row panels for the GEMM kernels (fp32 and int8)
    const size_t mt = (M + MB - 1) / MB, nt = (N + NB - 1) / NB, Kd = Kp / 4;
    auto task = [&](size_t t0, size_t t1, bool fresh) {
      if (use_digits) {
        const size_t n0 = t0 * NB, nc = std::min(N, t1 * NB) - n0;
        if (fresh) prefetch_run(digits->d.data() + n0 * Kd, nc * Kd);
        kern.i8_digits(q, qscale, qsum, M, Kp, digits->d.data() + n0 * Kd, nc, sc + n0, Y + n0, N);
        return;
      }
      for (size_t t = t0; t < t1; ++t) {
        const size_t m0 = t / nt * MB, n0 = t % nt * NB;
        const size_t mc = std::min(MB, M - m0), nc = std::min(NB, N - n0);
        const bool b = act_quant ? kern.i8(q + m0 * Kp, qscale + m0, qsum + m0, mc, Kp, w2 + n0 * Kb2, Kb2, nc,
                                           sc + n0, Y + m0 * N + n0, N)
                                 : kern.f32(a + m0 * Kp, mc, Kp, w2 + n0 * Kb2, Kb2, nc, sc + n0, Y + m0 * N + n0, N);
        if (b) bad = true;
      }
    };
    // A split quantization costs a barrier between the phases (~3 µs at 2-8 threads on the 16-core host): worth
    // it only for more than 2 ranges (e.g. K = 14336: 7), so shorter rows are quantized here.
    const size_t qitems = act_quant ? M * ranges : 0;
    const bool split = qitems > 2;
    if (!split) quantize(0, qitems);
    parallel_claim(api, ctx, threads, split ? qitems : 0, quantize, mt * nt, task);
  } else if (!base3 && !use_digits) {  // no product to detect invalid codes during: scan the bytes
    const uint8_t* p = w2;
    unsigned acc = 0;
    for (size_t i = 0; i < N * Kb2; ++i) acc |= p[i] & (p[i] >> 1) & 0x55u;
    bad = acc != 0;
  }
  if (bad) throw OpError(bad_msg);
  if (act_quant)
    for (size_t m = 0; m < M; ++m)
      if (qscale[m] == 0.f) std::fill(Y + m * N, Y + (m + 1) * N, 0.f);
}

}  // namespace

// The variant TernaryMatMul kernels of a mode get in this process ("avx512", ...; calibrates on first use);
// an empty string if BMOE_KERNEL names no available variant.
extern "C" __attribute__((visibility("default"))) const char* BmoeTernaryKernel(int act_quant) {
  try {
    return variant_name(ternary_variant(act_quant != 0));
  } catch (...) {
    return "";
  }
}

const OpDef kTernaryMatMulDef = {
    "TernaryMatMul", 3, 3,
    [](const OrtApi* api, const OrtKernelInfo* info, const SessionConfig&, void** k) {
      return guarded(api, "TernaryMatMul", [&] { *k = create(api, info); });
    },
    [](void* k, OrtKernelContext* ctx) {
      auto* kernel = static_cast<Kernel*>(k);
      return guarded(kernel->api, "TernaryMatMul", [&] { kernel->compute(ctx); });
    },
    [](void* k) { delete static_cast<Kernel*>(k); },
};

}  // namespace bmoe
