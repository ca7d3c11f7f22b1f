// TernaryMatMul, AVX-512 (F/BW/DQ/VL). fp32: trits → ±1.0f in registers
// (variable shift + 16-entry vpermps table), FMA into up to 8 rows of A at once
// so one decode serves 8 rows. int8 (no VNNI): trits → t+1 ∈ {0,1,2} bytes,
// vpmaddubsw against int8 activations, Σq subtracted at the end.
#include <immintrin.h>

#include <cstring>

#include "ternary.h"
#include "ternary_avx512.h"

namespace bmoe {
namespace ternary {
namespace {

// Decodes the 16 trits of packed dword `w` into floats {0, +1, -1}.
inline __m512 decode16(int32_t w) {
  const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  // vpermps reads the low 4 bits: this trit's code plus the next one's, hence the table repeats.
  const __m512 lut = _mm512_setr_ps(0, 1, -1, 0, 0, 1, -1, 0, 0, 1, -1, 0, 0, 1, -1, 0);
  return _mm512_permutexvar_ps(_mm512_srlv_epi32(_mm512_set1_epi32(w), shifts), lut);
}

template <int R>  // rows of A sharing one decode
void rows_f32(const float* A, size_t Kp, const uint8_t* row, size_t Kb, float s, float* Y, size_t ldy,
              __m128i& bad) {
  constexpr int NA = R == 1 ? 4 : R == 2 ? 2 : 1;  // independent accumulators to hide FMA latency
  __m512 acc[R][NA];
  for (int m = 0; m < R; ++m)
    for (int j = 0; j < NA; ++j) acc[m][j] = _mm512_setzero_ps();
  alignas(16) uint8_t buf[16];
  for (size_t c = 0; c < Kp / kChunk; ++c) {
    const uint8_t* p = chunk_ptr(row, c, Kb, buf);
    bad = flag_bad(bad, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    for (int d = 0; d < 4; ++d) {
      int32_t w;
      std::memcpy(&w, p + 4 * d, 4);
      const __m512 t = decode16(w);
      for (int m = 0; m < R; ++m)
        acc[m][d % NA] = _mm512_fmadd_ps(_mm512_loadu_ps(A + m * Kp + c * kChunk + d * 16), t, acc[m][d % NA]);
    }
  }
  for (int m = 0; m < R; ++m) {
    for (int j = 1; j < NA; ++j) acc[m][0] = _mm512_add_ps(acc[m][0], acc[m][j]);
    Y[m * ldy] = s * _mm512_reduce_add_ps(acc[m][0]);
  }
}

template <int R>
void rows_i8(const int8_t* Q, const float* qscale, const int32_t* qsum, size_t Kp, const uint8_t* row, size_t Kb,
             float sc, float* Y, size_t ldy, __m512i& bad) {
  const __m512i ones = _mm512_set1_epi16(1);
  __m512i acc[R];
  for (int m = 0; m < R; ++m) acc[m] = _mm512_setzero_si512();
  alignas(64) uint8_t buf[64];
  for (size_t c = 0; c < Kp / kQChunk; ++c) {
    const __m512i x = _mm512_loadu_si512(chunk_ptr(row, c, Kb, buf, 64));
    bad = flag_bad64(bad, x);
    for (int s = 0; s < 4; ++s) {
      const __m512i u = decode_u8(x, s);
      for (int m = 0; m < R; ++m) {
        const __m512i q = _mm512_loadu_si512(Q + m * Kp + c * kQChunk + 64 * s);
        // |u·q| pair sums ≤ 2·2·127: no int16 saturation.
        acc[m] = _mm512_add_epi32(acc[m], _mm512_madd_epi16(_mm512_maddubs_epi16(u, q), ones));
      }
    }
  }
  for (int m = 0; m < R; ++m)
    Y[m * ldy] = qscale[m] * sc * static_cast<float>(_mm512_reduce_add_epi32(acc[m]) - qsum[m]);
}

}  // namespace

bool f32_avx512(const float* A, size_t M, size_t Kp, const uint8_t* W, size_t Kb, size_t N, const float* scale,
                float* Y, size_t ldy) {
  __m128i bad = _mm_setzero_si128();
  for (size_t n = 0; n < N; ++n)
    for_row_blocks(M, [&](size_t m0, auto R) {
      rows_f32<decltype(R)::value>(A + m0 * Kp, Kp, W + n * Kb, Kb, scale[n], Y + m0 * ldy + n, ldy, bad);
    });
  return any_bad(bad);
}

bool i8_avx512(const int8_t* Q, const float* qscale, const int32_t* qsum, size_t M, size_t Kp, const uint8_t* W,
               size_t Kb, size_t N, const float* scale, float* Y, size_t ldy) {
  __m512i bad = _mm512_setzero_si512();
  for (size_t n = 0; n < N; ++n)
    for_row_blocks(M, [&](size_t m0, auto R) {
      rows_i8<decltype(R)::value>(Q + m0 * Kp, qscale + m0, qsum + m0, Kp, W + n * Kb, Kb, scale[n],
                                  Y + m0 * ldy + n, ldy, bad);
    });
  return any_bad64(bad);
}

}  // namespace ternary
}  // namespace bmoe
