// TernaryMatMul, AVX2 + FMA. fp32: trits → ±1.0f via variable shift + 8-entry
// vpermps table, one decode feeds up to 4 rows of A. int8: t+1 bytes via pshufb,
// vpmaddubsw/vpmaddwd against the int8 activations, Σq subtracted at the end.
#include <immintrin.h>

#include <cstring>
#include <type_traits>

#include "ternary.h"

namespace bmoe {
namespace ternary {
namespace {

inline bool any_bad(__m128i acc) { return !_mm_testz_si128(acc, _mm_set1_epi8(0x55)); }
inline __m128i flag_bad(__m128i acc, __m128i x) { return _mm_or_si128(acc, _mm_and_si128(x, _mm_srli_epi16(x, 1))); }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline int32_t hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1)));
}

template <int R>
void rows_f32(const float* A, size_t Kp, const uint8_t* row, size_t Kb, float s, float* Y, size_t ldy,
              __m128i& bad) {
  constexpr int NA = R == 1 ? 4 : R == 2 ? 2 : 1;
  const __m256i sh_lo = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  const __m256i sh_hi = _mm256_setr_epi32(16, 18, 20, 22, 24, 26, 28, 30);
  const __m256 lut = _mm256_setr_ps(0, 1, -1, 0, 0, 1, -1, 0);  // vpermps reads 3 bits
  __m256 acc[R][NA];
  for (int m = 0; m < R; ++m)
    for (int j = 0; j < NA; ++j) acc[m][j] = _mm256_setzero_ps();
  alignas(16) uint8_t buf[16];
  for (size_t c = 0; c < Kp / kChunk; ++c) {
    const uint8_t* p = chunk_ptr(row, c, Kb, buf);
    bad = flag_bad(bad, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    for (int d = 0; d < 8; ++d) {  // 8 trits per step
      int32_t w;
      std::memcpy(&w, p + 4 * (d / 2), 4);
      const __m256i v = _mm256_srlv_epi32(_mm256_set1_epi32(w), d % 2 ? sh_hi : sh_lo);
      const __m256 t = _mm256_permutevar8x32_ps(lut, v);
      for (int m = 0; m < R; ++m)
        acc[m][d % NA] = _mm256_fmadd_ps(_mm256_loadu_ps(A + m * Kp + c * kChunk + d * 8), t, acc[m][d % NA]);
    }
  }
  for (int m = 0; m < R; ++m) {
    for (int j = 1; j < NA; ++j) acc[m][0] = _mm256_add_ps(acc[m][0], acc[m][j]);
    Y[m * ldy] = s * hsum(acc[m][0]);
  }
}

template <int R>
void rows_i8(const int8_t* Q, const float* qscale, const int32_t* qsum, size_t Kp, const uint8_t* row, size_t Kb,
             float sc, float* Y, size_t ldy, __m128i& bad) {
  const __m256i lut = _mm256_setr_epi8(1, 2, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,  //
                                       1, 2, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m256i three = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
  __m256i acc[R];
  for (int m = 0; m < R; ++m) acc[m] = _mm256_setzero_si256();
  alignas(64) uint8_t buf[64];
  for (size_t c = 0; c < Kp / kQChunk; ++c) {
    const uint8_t* p = chunk_ptr(row, c, Kb, buf, 64);
    const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32));
    const __m256i xb = _mm256_or_si256(_mm256_and_si256(x0, _mm256_srli_epi16(x0, 1)),
                                       _mm256_and_si256(x1, _mm256_srli_epi16(x1, 1)));
    bad = _mm_or_si128(bad, _mm_or_si128(_mm256_castsi256_si128(xb), _mm256_extracti128_si256(xb, 1)));
    for (int s = 0; s < 4; ++s) {  // t+1 bytes at qpos s*64 + 0..31 and s*64 + 32..63
      const __m128i sh = _mm_cvtsi32_si128(2 * s);
      const __m256i u0 = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srl_epi16(x0, sh), three));
      const __m256i u1 = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srl_epi16(x1, sh), three));
      for (int m = 0; m < R; ++m) {
        const int8_t* q = Q + m * Kp + c * kQChunk + 64 * s;
        const __m256i p0 = _mm256_maddubs_epi16(u0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)));
        const __m256i p1 = _mm256_maddubs_epi16(u1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32)));
        acc[m] = _mm256_add_epi32(acc[m], _mm256_madd_epi16(_mm256_add_epi16(p0, p1), ones));  // |p0+p1| ≤ 1016
      }
    }
  }
  for (int m = 0; m < R; ++m) Y[m * ldy] = qscale[m] * sc * static_cast<float>(minus_qsum(hsum(acc[m]), qsum[m]));
}

}  // namespace

bool f32_avx2(const float* A, size_t M, size_t Kp, const uint8_t* W, size_t Kb, size_t N, const float* scale,
              float* Y, size_t ldy) {
  __m128i bad = _mm_setzero_si128();
  for (size_t n = 0; n < N; ++n)
    for_row_blocks<4>(M, [&](size_t m0, auto R) {
      rows_f32<decltype(R)::value>(A + m0 * Kp, Kp, W + n * Kb, Kb, scale[n], Y + m0 * ldy + n, ldy, bad);
    });
  return any_bad(bad);
}

bool i8_avx2(const int8_t* Q, const float* qscale, const int32_t* qsum, size_t M, size_t Kp, const uint8_t* W,
             size_t Kb, size_t N, const float* scale, float* Y, size_t ldy) {
  __m128i bad = _mm_setzero_si128();
  for (size_t n = 0; n < N; ++n)
    for_row_blocks<4>(M, [&](size_t m0, auto R) {
      rows_i8<decltype(R)::value>(Q + m0 * Kp, qscale + m0, qsum + m0, Kp, W + n * Kb, Kb, scale[n],
                                  Y + m0 * ldy + n, ldy, bad);
    });
  return any_bad(bad);
}

}  // namespace ternary
}  // namespace bmoe
