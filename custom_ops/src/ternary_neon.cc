// TernaryMatMul, AArch64 NEON: trits decoded with tbl into int8 {−1,0,1};
// fp32 widens them to float (vld4q de-interleaves A to match); int8 uses smull.
#if defined(__aarch64__)
#include "ternary_neon.h"

namespace bmoe {
namespace ternary {

bool f32_neon(const float* A, size_t M, size_t Kp, const uint8_t* W, size_t Kb, size_t N, const float* scale,
              float* Y, size_t ldy) {
  uint8x16_t bad = vdupq_n_u8(0);
  alignas(16) uint8_t buf[16];
  for (size_t n = 0; n < N; ++n) {
    const uint8_t* row = W + n * Kb;
    for (size_t m = 0; m < M; ++m) {
      float32x4_t acc = vdupq_n_f32(0.f);
      for (size_t c = 0; c < Kp / kChunk; ++c) {
        const Trits64 tr = decode16(chunk_ptr(row, c, Kb, buf), bad);
        for (int i = 0; i < 4; ++i) {  // bytes 4i..4i+3 of the chunk = trits 16i..16i+15
          const float32x4x4_t a = vld4q_f32(A + m * Kp + c * kChunk + 16 * i);  // a.val[s][j] = A[16i+4j+s]
          for (int s = 0; s < 4; ++s) {
            const int16x8_t w16 = vmovl_s8(i < 2 ? vget_low_s8(tr.t[s]) : vget_high_s8(tr.t[s]));
            const int32x4_t w32 = vmovl_s16(i % 2 ? vget_high_s16(w16) : vget_low_s16(w16));
            acc = vfmaq_f32(acc, a.val[s], vcvtq_f32_s32(w32));
          }
        }
      }
      Y[m * ldy + n] = scale[n] * vaddvq_f32(acc);
    }
  }
  return any_bad(bad);
}

bool i8_neon(const int8_t* Q, const float* qscale, const int32_t*, size_t M, size_t Kp, const uint8_t* W, size_t Kb,
             size_t N, const float* scale, float* Y, size_t ldy) {
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
          for (int s = 0; s < 4; ++s) {
            const int8x16_t q = vld1q_s8(Q + m * Kp + c * kQChunk + 64 * s + 16 * v);
            acc = vpadalq_s16(acc, vmull_s8(vget_low_s8(tr.t[s]), vget_low_s8(q)));
            acc = vpadalq_s16(acc, vmull_high_s8(tr.t[s], q));
          }
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
