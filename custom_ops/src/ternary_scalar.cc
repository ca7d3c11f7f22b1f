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

// Reference of the LUT layout (ternary.h): table i of a triple is Σ_c t_c·a_c with
// t_c = (i / 3^c) % 3 − 1, zero trits skipped.
void lut_tables_scalar(const float* a, size_t J, float* tab) {
  for (size_t tr = 0; tr < 6 * J; ++tr, tab += 32) {
    const float* x = a + 3 * tr;
    for (int i = 0; i < 32; ++i) {
      float e = 0.f;
      for (int c = 0, d = i; c < 3 && i < 27; ++c, d /= 3) e = d % 3 == 2 ? e + x[c] : d % 3 == 0 ? e - x[c] : e;
      tab[i] = e;
    }
  }
}

void lut_scalar(const float* tab, size_t J, const uint32_t* Wl, size_t g0, size_t g1, const float* scale, size_t N,
                float* Y) {
  for (size_t g = g0; g < g1; ++g)
    for (size_t r = 0; r < kLutRows && g * kLutRows + r < N; ++r) {
      float acc = 0.f;
      for (size_t j = 0; j < J; ++j) {
        const uint32_t w = Wl[(g * J + j) * kLutRows + r];
        for (size_t s = 0; s < 6; ++s) acc += tab[(6 * j + s) * 32 + ((w >> (5 * s)) & 31u)];
      }
      Y[g * kLutRows + r] = scale[g * kLutRows + r] * acc;
    }
}

}  // namespace ternary
}  // namespace bmoe
