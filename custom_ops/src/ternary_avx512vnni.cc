// TernaryMatMul int8 path with AVX-512 VNNI: vpdpbusd multiplies the t+1 bytes
// by the int8 activations and accumulates into int32 in one instruction.
#include "ternary_avx512.h"

namespace bmoe {
namespace ternary {
namespace {

constexpr size_t kPrefetchBytes = 1024;

template <int R>
void rows_vnni(const int8_t* Q, const float* qscale, const int32_t* qsum, size_t Kp, const uint8_t* row, size_t Kb,
               float sc, float* Y, size_t ldy, __m512i& bad) {
  constexpr int NA = R == 1 ? 4 : R == 2 ? 2 : 1;  // independent accumulators to hide vpdpbusd latency
  __m512i acc[R][NA];
  for (int m = 0; m < R; ++m)
    for (int j = 0; j < NA; ++j) acc[m][j] = _mm512_setzero_si512();
  alignas(64) uint8_t buf[64];
  for (size_t c = 0; c < Kp / kQChunk; ++c) {
    // Weights from DRAM at decode: the hardware prefetcher alone leaves this loop waiting on loads
    // (rows follow each other, so running past this row's end prefetches the next one's start).
    _mm_prefetch(reinterpret_cast<const char*>(row + 64 * c + kPrefetchBytes), _MM_HINT_T0);
    const __m512i x = _mm512_loadu_si512(chunk_ptr(row, c, Kb, buf, 64));
    bad = flag_bad64(bad, x);
    for (int s = 0; s < 4; ++s) {
      const __m512i u = decode_u8(x, s);
      for (int m = 0; m < R; ++m)
        acc[m][s % NA] = _mm512_dpbusd_epi32(acc[m][s % NA], u, _mm512_loadu_si512(Q + m * Kp + c * kQChunk + 64 * s));
    }
  }
  for (int m = 0; m < R; ++m) {
    for (int j = 1; j < NA; ++j) acc[m][0] = _mm512_add_epi32(acc[m][0], acc[m][j]);
    Y[m * ldy] = qscale[m] * sc * static_cast<float>(_mm512_reduce_add_epi32(acc[m][0]) - qsum[m]);
  }
}

}  // namespace

bool i8_avx512vnni(const int8_t* Q, const float* qscale, const int32_t* qsum, size_t M, size_t Kp,
                   const uint8_t* W, size_t Kb, size_t N, const float* scale, float* Y, size_t ldy) {
  __m512i bad = _mm512_setzero_si512();
  for (size_t n = 0; n < N; ++n)
    for_row_blocks<8>(M, [&](size_t m0, auto R) {
      rows_vnni<decltype(R)::value>(Q + m0 * Kp, qscale + m0, qsum + m0, Kp, W + n * Kb, Kb, scale[n],
                                    Y + m0 * ldy + n, ldy, bad);
    });
  return any_bad64(bad);
}

}  // namespace ternary
}  // namespace bmoe
