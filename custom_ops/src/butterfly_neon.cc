// ButterflyRotate, AArch64 NEON: a 16-float chunk is four registers; h = 1, 2 are
// in-register permutes, h = 4, 8 pair whole registers.
#if defined(__aarch64__)
#include <arm_neon.h>

#include "butterfly.h"

namespace bmoe {
namespace butterfly {
namespace {

void expanded_stages(float* z, size_t D, size_t S, const float* table, bool transpose) {
  const size_t P = size_t{1} << S, ns = S < kExpanded ? S : kExpanded;
  size_t i0 = 0;
  for (; i0 + kChunk <= D; i0 += kChunk) {
    float32x4_t v[4] = {vld1q_f32(z + i0), vld1q_f32(z + i0 + 4), vld1q_f32(z + i0 + 8), vld1q_f32(z + i0 + 12)};
    for (size_t n = 0; n < ns; ++n) {
      const size_t s = transpose ? ns - 1 - n : n;
      const float* c = table + stage_offset(s, P) + i0;
      float32x4_t p[4];
      for (int r = 0; r < 4; ++r)
        p[r] = s == 0 ? vrev64q_f32(v[r]) : s == 1 ? vextq_f32(v[r], v[r], 2) : v[r ^ (s == 2 ? 1 : 2)];
      for (int r = 0; r < 4; ++r) {
        const float32x4_t cv = vmulq_f32(vld1q_f32(c + 4 * r), v[r]), g = vld1q_f32(c + P + 4 * r);
        v[r] = transpose ? vfmsq_f32(cv, g, p[r]) : vfmaq_f32(cv, g, p[r]);
      }
    }
    for (int r = 0; r < 4; ++r) vst1q_f32(z + i0 + 4 * r, v[r]);
  }
  if (i0 < D) expanded_chunk_scalar(z, D, S, table, transpose, i0);
}

void pair_stage4(float* z, size_t D, size_t S, size_t s, const float* table, bool transpose) {
  const size_t P = size_t{1} << S, h = size_t{1} << s;
  const float* cs = table + stage_offset(s, P);
  pair_stage(z, D, S, s, table, transpose, 4, [&](size_t j, size_t k, size_t len) {
    for (size_t i = 0; i < len; i += 4) {
      const float32x4_t lo = vld1q_f32(z + j + i), hi = vld1q_f32(z + j + h + i);
      const float32x4_t c = vld1q_f32(cs + k + i), sn = vld1q_f32(cs + P / 2 + k + i);
      const float32x4_t clo = vmulq_f32(c, lo), chi = vmulq_f32(c, hi);
      vst1q_f32(z + j + i, transpose ? vfmaq_f32(clo, sn, hi) : vfmsq_f32(clo, sn, hi));
      vst1q_f32(z + j + h + i, transpose ? vfmsq_f32(chi, sn, lo) : vfmaq_f32(chi, sn, lo));
    }
  });
}

}  // namespace

void rotate_neon(float* z, size_t D, size_t S, const float* table, bool transpose) {
  if (!transpose) {
    expanded_stages(z, D, S, table, false);
    for (size_t s = kExpanded; s < S; ++s) pair_stage4(z, D, S, s, table, false);
  } else {
    for (size_t s = S; s-- > kExpanded;) pair_stage4(z, D, S, s, table, true);
    expanded_stages(z, D, S, table, true);
  }
}

}  // namespace butterfly
}  // namespace bmoe
#endif
