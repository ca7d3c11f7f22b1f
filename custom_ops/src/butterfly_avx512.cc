// ButterflyRotate, AVX-512: the four small stages (h = 1,2,4,8) fused per 16-float
// register (in-lane / 128-bit-lane shuffles), the others as 16-wide pair updates.
#include <immintrin.h>

#include "butterfly.h"

namespace bmoe {
namespace butterfly {
namespace {

inline __m512 partner(__m512 v, size_t s) {  // element i ↔ i ^ 2^s
  switch (s) {
    case 0: return _mm512_permute_ps(v, 0xB1);
    case 1: return _mm512_permute_ps(v, 0x4E);
    case 2: return _mm512_shuffle_f32x4(v, v, 0xB1);
    default: return _mm512_shuffle_f32x4(v, v, 0x4E);
  }
}

void expanded_stages(float* z, size_t D, size_t S, const float* table, bool transpose) {
  const size_t P = size_t{1} << S, ns = S < kExpanded ? S : kExpanded;
  size_t i0 = 0;
  for (; i0 + kChunk <= D; i0 += kChunk) {
    __m512 v = _mm512_loadu_ps(z + i0);
    for (size_t n = 0; n < ns; ++n) {
      const size_t s = transpose ? ns - 1 - n : n;
      const float* c = table + stage_offset(s, P) + i0;
      const __m512 cv = _mm512_mul_ps(_mm512_loadu_ps(c), v), g = _mm512_loadu_ps(c + P);
      v = transpose ? _mm512_fnmadd_ps(g, partner(v, s), cv) : _mm512_fmadd_ps(g, partner(v, s), cv);
    }
    _mm512_storeu_ps(z + i0, v);
  }
  if (i0 < D) expanded_chunk_scalar(z, D, S, table, transpose, i0);
}

void pair_stage16(float* z, size_t D, size_t S, size_t s, const float* table, bool transpose) {
  const size_t P = size_t{1} << S, h = size_t{1} << s;
  const float* cs = table + stage_offset(s, P);
  pair_stage(z, D, S, s, table, transpose, 16, [&](size_t j, size_t k, size_t len) {
    for (size_t i = 0; i < len; i += 16) {
      const __m512 lo = _mm512_loadu_ps(z + j + i), hi = _mm512_loadu_ps(z + j + h + i);
      const __m512 c = _mm512_loadu_ps(cs + k + i), sn = _mm512_loadu_ps(cs + P / 2 + k + i);
      const __m512 clo = _mm512_mul_ps(c, lo), chi = _mm512_mul_ps(c, hi);
      _mm512_storeu_ps(z + j + i, transpose ? _mm512_fmadd_ps(sn, hi, clo) : _mm512_fnmadd_ps(sn, hi, clo));
      _mm512_storeu_ps(z + j + h + i, transpose ? _mm512_fnmadd_ps(sn, lo, chi) : _mm512_fmadd_ps(sn, lo, chi));
    }
  });
}

}  // namespace

void rotate_avx512(float* z, size_t D, size_t S, const float* table, bool transpose) {
  if (!transpose) {
    expanded_stages(z, D, S, table, false);
    for (size_t s = kExpanded; s < S; ++s) pair_stage16(z, D, S, s, table, false);
  } else {
    for (size_t s = S; s-- > kExpanded;) pair_stage16(z, D, S, s, table, true);
    expanded_stages(z, D, S, table, true);
  }
}

}  // namespace butterfly
}  // namespace bmoe
