// cos/sin of a block of angles: Cephes' single-precision polynomials (sinf/cosf,
// max error ~2 ulp for |θ| ≤ 8192) written branch-free so that the compiler
// vectorises the loop, with libm for the rare angle outside that range (or NaN/Inf).
// Built with -ffp-contract=off -fno-trapping-math (lets GCC if-convert the loop) and without per-ISA flags (CMakeLists.txt): every
// kernel variant and both forms of ButterflyRotate get bit-identical tables.
#include "sincos.h"

#include <cmath>
#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace bmoe {
namespace {

constexpr float kMaxPoly = 8192.f;  // Cody-Waite reduction below stays within ~1 ulp up to here

inline uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

}  // namespace

// x86-64 Linux: one clone per vector width (picked once by the loader); identical results, as
// every clone does the same IEEE operations in the same order (no contraction).
#if defined(__x86_64__) && defined(__linux__) && !defined(__clang__)
#define BMOE_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define BMOE_CLONES
#endif

BMOE_CLONES void sincos_block(const float* th, size_t n, float* c, float* s) {
  // Integer masks and selects only, so that the loop has no control flow and vectorises.
  uint32_t outside = 0;
  for (size_t i = 0; i < n; ++i) {
    const uint32_t xb = bits(th[i]), ab = xb & 0x7fffffffu;
    outside |= ab > bits(kMaxPoly);  // also NaN/Inf: fixed below
    const float ax = from_bits(ab > bits(kMaxPoly) ? 0u : ab);  // keeps the int conversion defined
    int j = static_cast<int>(ax * 1.27323954473516f);  // 4/π
    j = (j + 1) & ~1;
    const float y = static_cast<float>(j);
    const float r = ((ax - y * 0.78515625f) - y * 2.4187564849853515625e-4f) - y * 3.77489497744594108e-8f;
    const float z = r * r;
    const float pc = ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z + 4.166664568298827e-2f) * z * z -
                     0.5f * z + 1.f;
    const float ps = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * r + r;
    const uint32_t swap = 0u - static_cast<uint32_t>((j >> 1) & 1);  // all ones where the polynomials swap
    const uint32_t sin_neg = (static_cast<uint32_t>(j & 4) << 29) ^ (xb & 0x80000000u);
    const uint32_t cos_neg = static_cast<uint32_t>(~(j - 2) & 4) << 29;
    s[i] = from_bits(((bits(pc) & swap) | (bits(ps) & ~swap)) ^ sin_neg);
    c[i] = from_bits(((bits(ps) & swap) | (bits(pc) & ~swap)) ^ cos_neg);
  }
  if (outside)
    for (size_t i = 0; i < n; ++i)
      if (!(std::fabs(th[i]) <= kMaxPoly)) c[i] = std::cos(th[i]), s[i] = std::sin(th[i]);
}

#if defined(__aarch64__)
using Half = __fp16;  // the ACLE storage type (GCC 12 has no _Float16 in C++ on AArch64)
#else
using Half = _Float16;
#endif

namespace {
void half_to_float_generic(const uint16_t* h, size_t n, float* out) {
  for (size_t i = 0; i < n; ++i) {  // exact: the compiler's conversion
    Half x;
    std::memcpy(&x, h + i, 2);
    out[i] = static_cast<float>(x);
  }
}

#if defined(__x86_64__) && defined(__linux__) && !defined(__clang__)
// GCC does not vectorise the loop above: 8 halves per vcvtph2ps (exact, denormals included).
__attribute__((target("avx,f16c"))) void half_to_float_f16c(const uint16_t* h, size_t n, float* out) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
  half_to_float_generic(h + i, n - i, out + i);
}
#endif
}  // namespace

void half_to_float_block(const uint16_t* h, size_t n, float* out) {
#if defined(__x86_64__) && defined(__linux__) && !defined(__clang__)
  static const bool f16c = __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx");
  if (f16c) return half_to_float_f16c(h, n, out);
#endif
  half_to_float_generic(h, n, out);
}

}  // namespace bmoe
