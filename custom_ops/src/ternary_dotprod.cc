// TernaryMatMul int8 path with the Armv8.2 dot-product extension (sdot): each 64-byte chunk of a weight row is
// decoded once for up to 4 rows of A (prefill), which then cost 16 sdot each.
#if defined(__aarch64__)
#include "ternary_neon.h"

namespace bmoe {
namespace ternary {
namespace {

template <int R>
void rows_dotprod(const int8_t* Q, const float* qscale, size_t Kp, const uint8_t* row, size_t Kb, float sc, float* Y,
                  size_t ldy, uint8x16_t& bad) {
  int32x4_t acc[R];
  for (int m = 0; m < R; ++m) acc[m] = vdupq_n_s32(0);
  alignas(16) uint8_t buf[64];
  for (size_t c = 0; c < Kp / kQChunk; ++c) {
    const uint8_t* p = chunk_ptr(row, c, Kb, buf, 64);
    Trits64 tr[4];
    for (int v = 0; v < 4; ++v) tr[v] = decode16(p + 16 * v, bad);  // packed bytes 16v.. → qpos s*64 + 16v + b
    for (int m = 0; m < R; ++m) {
      const int8_t* q = Q + m * Kp + c * kQChunk;
      for (int v = 0; v < 4; ++v)
        for (int s = 0; s < 4; ++s) acc[m] = vdotq_s32(acc[m], tr[v].t[s], vld1q_s8(q + 64 * s + 16 * v));
    }
  }
  for (int m = 0; m < R; ++m) Y[m * ldy] = qscale[m] * sc * static_cast<float>(vaddvq_s32(acc[m]));
}

}  // namespace

bool i8_dotprod(const int8_t* Q, const float* qscale, const int32_t*, size_t M, size_t Kp, const uint8_t* W,
                size_t Kb, size_t N, const float* scale, float* Y, size_t ldy) {
  uint8x16_t bad = vdupq_n_u8(0);
  for (size_t n = 0; n < N; ++n)
    for_row_blocks<4>(M, [&](size_t m0, auto R) {
      rows_dotprod<decltype(R)::value>(Q + m0 * Kp, qscale + m0, Kp, W + n * Kb, Kb, scale[n], Y + m0 * ldy + n, ldy,
                                       bad);
    });
  return any_bad(bad);
}

}  // namespace ternary
}  // namespace bmoe
#endif
