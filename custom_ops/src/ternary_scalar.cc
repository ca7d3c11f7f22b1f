// Scalar reference for TernaryMatMul: one trit at a time, straight from the spec.
#include "ternary.h"

namespace bmoe {
namespace ternary {

static inline int trit(const uint8_t* row, size_t k, unsigned& bad) {
  unsigned code = (row[k >> 2] >> (2 * (k & 3))) & 3u;
  bad |= code == 3u;
  return static_cast<int>(code & 1u) - static_cast<int>(code >> 1);  // 00→0, 01→+1, 10→−1
}

bool f32_scalar(const float* A, size_t M, size_t Kp, const uint8_t* W, size_t Kb, size_t N, const float* scale,
                float* Y, size_t ldy) {
  unsigned bad = 0;
  const size_t K = Kb * 4;  // trits past the real K meet zero-padded activations
  for (size_t n = 0; n < N; ++n) {
    const uint8_t* row = W + n * Kb;
    for (size_t m = 0; m < M; ++m) {
      const float* a = A + m * Kp;
      float acc = 0.f;
      for (size_t k = 0; k < K; ++k) {
        int t = trit(row, k, bad);
        acc += t > 0 ? a[k] : t < 0 ? -a[k] : 0.f;
      }
      Y[m * ldy + n] = scale[n] * acc;
    }
  }
  return bad != 0;
}

bool i8_scalar(const int8_t* Q, const float* qscale, const int32_t*, size_t M, size_t Kp, const uint8_t* W,
               size_t Kb, size_t N, const float* scale, float* Y, size_t ldy) {
  unsigned bad = 0;
  const size_t K = Kb * 4;
  for (size_t n = 0; n < N; ++n) {
    const uint8_t* row = W + n * Kb;
    for (size_t m = 0; m < M; ++m) {
      const int8_t* q = Q + m * Kp;
      int32_t acc = 0;
      for (size_t k = 0; k < K; ++k) acc += trit(row, k, bad) * q[qpos(k)];
      Y[m * ldy + n] = qscale[m] * scale[n] * static_cast<float>(acc);
    }
  }
  return bad != 0;
}

}  // namespace ternary
}  // namespace bmoe
