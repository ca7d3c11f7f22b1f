// Helpers shared by the AVX-512 TernaryMatMul files (both built with AVX-512
// flags). Internal linkage only, so nothing here can be merged into generic code.
#pragma once
#include <immintrin.h>

#include <cstring>
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

// Σ of the 16 int32 lanes, wrapping, in vector adds only (GCC's _mm512_reduce_add_epi32 ends in a signed scalar add,
// undefined on overflow, and act_quant's Σ d·Q may pass 2^31: see minus_qsum).
inline int32_t hsum_epi32(__m512i v) {
  const __m256i a = _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1)));
}

// Bytes t+1 ∈ {0,1,2} of the trits at shift 2s of 64 packed bytes (qpos order).
inline __m512i decode_u8(__m512i x, int s) {
  const __m512i lut = _mm512_broadcast_i32x4(_mm_setr_epi8(1, 2, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0));
  const __m512i codes = _mm512_and_si512(_mm512_srl_epi16(x, _mm_cvtsi32_si128(2 * s)), _mm512_set1_epi8(3));
  return _mm512_shuffle_epi8(lut, codes);
}

// Lane r: bytes [off, off + 4) of row n0 + r of W (rows of Kb bytes; `rows` = r·Kb), for the cnt ≤ 16 live lanes;
// other lanes and bytes past a row's end are 0 (code 00).
inline __m512i gather_row_dwords(const uint8_t* W, size_t Kb, __m512i rows, size_t n0, size_t cnt, size_t off) {
  if (cnt == 0 || off >= Kb) return _mm512_setzero_si512();
  if (off + 4 <= Kb)
    return _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), static_cast<__mmask16>((1u << cnt) - 1), rows,
                                       W + n0 * Kb + off, 1);
  alignas(64) uint32_t part[16] = {};  // the row's last partial dword: zero-filled
  for (size_t r = 0; r < cnt; ++r) std::memcpy(&part[r], W + (n0 + r) * Kb + off, Kb - off);
  return _mm512_load_si512(part);
}

}  // namespace
}  // namespace ternary
}  // namespace bmoe
