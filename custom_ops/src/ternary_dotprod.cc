// TernaryMatMul int8 path with the Armv8.2 dot-product extension (sdot).
#if defined(__aarch64__)
#include "ternary_neon.h"

namespace bmoe {
namespace ternary {

bool i8_dotprod(const int8_t* Q, const float* qscale, const int32_t*, size_t M, size_t Kp, const uint8_t* W,
                size_t Kb, size_t N, const float* scale, float* Y, size_t ldy) {
  uint8x16_t bad = vdupq_n_u8(0);
  alignas(16) uint8_t buf[64];
  for (size_t n = 0; n < N; ++n) {
    const uint8_t* row = W + n * Kb;
    for (size_t m = 0; m < M; ++m) {
      int32x4_t acc = vdupq_n_s32(0);
      for (size_t c = 0; c < Kp / kQChunk; ++c) {
        const uint8_t* p = chunk_ptr(row, c, Kb, buf, 64);
        for (int v = 0; v < 4; ++v) {  // packed bytes 16v.. → qpos s*64 + 16v + b
          const Trits64 tr = decode16(p + 16 * v, bad);
          for (int s = 0; s < 4; ++s)
            acc = vdotq_s32(acc, tr.t[s], vld1q_s8(Q + m * Kp + c * kQChunk + 64 * s + 16 * v));
        }
      }
      Y[m * ldy + n] = qscale[m] * scale[n] * static_cast<float>(vaddvq_s32(acc));
    }
  }
  return any_bad(bad);
}

}  // namespace ternary
}  // namespace bmoe
#endif
