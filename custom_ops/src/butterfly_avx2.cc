// ButterflyRotate, AVX2 + FMA: a 16-float chunk is two registers; the small stages
// h = 1, 2 are in-lane shuffles, h = 4 swaps 128-bit halves, h = 8 swaps registers.
#include <immintrin.h>

#include "butterfly.h"

namespace bmoe {
namespace butterfly {
namespace {

inline __m256 stage(__m256 v, __m256 p, const float* c, size_t P, bool transpose) {
  const __m256 cv = _mm256_mul_ps(_mm256_loadu_ps(c), v), g = _mm256_loadu_ps(c + P);
  return transpose ? _mm256_fnmadd_ps(g, p, cv) : _mm256_fmadd_ps(g, p, cv);
}

inline __m256 partner(__m256 v, size_t s) {
  switch (s) {
    case 0: return _mm256_permute_ps(v, 0xB1);
    case 1: return _mm256_permute_ps(v, 0x4E);
    default: return _mm256_permute2f128_ps(v, v, 1);
  }
}

void expanded_stages(float* z, size_t D, size_t S, const float* table, bool transpose) {
  const size_t P = size_t{1} << S, ns = S < kExpanded ? S : kExpanded;
  size_t i0 = 0;
  for (; i0 + kChunk <= D; i0 += kChunk) {
    __m256 v0 = _mm256_loadu_ps(z + i0), v1 = _mm256_loadu_ps(z + i0 + 8);
    for (size_t n = 0; n < ns; ++n) {
      const size_t s = transpose ? ns - 1 - n : n;
      const float* c = table + stage_offset(s, P) + i0;
      const __m256 p0 = s == 3 ? v1 : partner(v0, s), p1 = s == 3 ? v0 : partner(v1, s);
      v0 = stage(v0, p0, c, P, transpose);
      v1 = stage(v1, p1, c + 8, P, transpose);
    }
    _mm256_storeu_ps(z + i0, v0);
    _mm256_storeu_ps(z + i0 + 8, v1);
  }
  if (i0 < D) expanded_chunk_scalar(z, D, S, table, transpose, i0);
}

void pair_stage8(float* z, size_t D, size_t S, size_t s, const float* table, bool transpose) {
  const size_t P = size_t{1} << S, h = size_t{1} << s;
  const float* cs = table + stage_offset(s, P);
  pair_stage(z, D, S, s, table, transpose, 8, [&](size_t j, size_t k, size_t len) {
    for (size_t i = 0; i < len; i += 8) {
      const __m256 lo = _mm256_loadu_ps(z + j + i), hi = _mm256_loadu_ps(z + j + h + i);
      const __m256 c = _mm256_loadu_ps(cs + k + i), sn = _mm256_loadu_ps(cs + P / 2 + k + i);
      const __m256 clo = _mm256_mul_ps(c, lo), chi = _mm256_mul_ps(c, hi);
      _mm256_storeu_ps(z + j + i, transpose ? _mm256_fmadd_ps(sn, hi, clo) : _mm256_fnmadd_ps(sn, hi, clo));
      _mm256_storeu_ps(z + j + h + i, transpose ? _mm256_fnmadd_ps(sn, lo, chi) : _mm256_fmadd_ps(sn, lo, chi));
    }
  });
}

}  // namespace

void rotate_avx2(float* z, size_t D, size_t S, const float* table, bool transpose) {
  if (!transpose) {
    expanded_stages(z, D, S, table, false);
    for (size_t s = kExpanded; s < S; ++s) pair_stage8(z, D, S, s, table, false);
  } else {
    for (size_t s = S; s-- > kExpanded;) pair_stage8(z, D, S, s, table, true);
    expanded_stages(z, D, S, table, true);
  }
}

}  // namespace butterfly
}  // namespace bmoe
