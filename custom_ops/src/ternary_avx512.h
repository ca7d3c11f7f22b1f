// Helpers shared by the AVX-512 TernaryMatMul files (both built with AVX-512
// flags). Internal linkage only, so nothing here can be merged into generic code.
#pragma once
#include <immintrin.h>

#include <type_traits>

#include "ternary.h"

namespace bmoe {
namespace ternary {
namespace {

inline bool any_bad(__m128i acc) { return !_mm_testz_si128(acc, _mm_set1_epi8(0x55)); }
// Collects b & (b >> 1); masked with 0x55 at the end, nonzero iff a code is 11.
inline __m128i flag_bad(__m128i acc, __m128i x) { return _mm_or_si128(acc, _mm_and_si128(x, _mm_srli_epi16(x, 1))); }

// Zero unless some 2-bit code in the 64 bytes seen is 11 (acc |= x & (x >> 1), masked with 0x55).
inline __m512i flag_bad64(__m512i acc, __m512i x) { return _mm512_ternarylogic_epi32(acc, x, _mm512_srli_epi16(x, 1), 0xF8); }
inline bool any_bad64(__m512i acc) { return _mm512_test_epi8_mask(acc, _mm512_set1_epi8(0x55)) != 0; }

// Bytes t+1 ∈ {0,1,2} of the trits at shift 2s of 64 packed bytes (qpos order).
inline __m512i decode_u8(__m512i x, int s) {
  const __m512i lut = _mm512_broadcast_i32x4(_mm_setr_epi8(1, 2, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0));
  const __m512i codes = _mm512_and_si512(_mm512_srl_epi16(x, _mm_cvtsi32_si128(2 * s)), _mm512_set1_epi8(3));
  return _mm512_shuffle_epi8(lut, codes);
}

}  // namespace
}  // namespace ternary
}  // namespace bmoe
