// Scalar reference for TernaryMatMul: one trit at a time, straight from the spec.
#include <algorithm>
#include <cmath>

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

// Digit rows (ternary.h): Σ_k d·q − Σq in wrapping uint32 (the true sum fits in int32; its parts may not).
void i8_digits_scalar(const int8_t* Q, const float* qscale, const int32_t* qsum, size_t M, size_t Kp, const uint8_t* D,
                      size_t N, const float* scale, float* Y, size_t ldy) {
  const size_t Kd = Kp / 4;
  for (size_t n = 0; n < N; ++n) {
    const uint8_t* row = D + n * Kd;
    for (size_t m = 0; m < M; ++m) {
      const int8_t* q = Q + m * Kp;
      uint32_t acc = 0;
      for (size_t k = 0; k < Kp; ++k)
        acc += static_cast<uint32_t>(static_cast<int32_t>((row[k >> 2] >> (2 * (k & 3))) & 3u) * q[qpos(k)]);
      acc -= static_cast<uint32_t>(qsum[m]);
      Y[m * ldy + n] = qscale[m] * scale[n] * static_cast<float>(static_cast<int32_t>(acc));
    }
  }
}

float abs_max_scalar(const float* a, size_t K) {
  float part[8] = {};  // independent partial maxima: no serial maxss chain
  for (size_t i = 0; i < K; ++i) part[i % 8] = std::fabs(a[i]) > part[i % 8] ? std::fabs(a[i]) : part[i % 8];
  return *std::max_element(part, part + 8);  // NaN never enters a partial
}

int32_t quantize_range_scalar(const float* a, size_t k0, size_t k1, size_t K, float s, int8_t* q) {
  int32_t sum = 0;
  for (size_t i = k0; i < k1; ++i) {
    if (i >= K) {
      q[qpos(i)] = 0;
      continue;
    }
    // Clamp first (written so that NaN also lands in range and the cast is defined), then
    // round half away from zero: exact in double.
    float v = a[i] / s;
    v = v > -127.f ? v : -127.f;
    v = v < 127.f ? v : 127.f;
    const int8_t r = static_cast<int8_t>(static_cast<int>(v + std::copysign(0.5, v)));
    q[qpos(i)] = r;
    sum += r;
  }
  return sum;
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

void lut_scalar(const float* tab, size_t w, const uint32_t* Wi, size_t ng, float* P) {
  for (size_t g = 0; g < ng; ++g)
    for (size_t r = 0; r < kLutRows; ++r) {
      float sum[2] = {0.f, 0.f};  // even and odd s
      for (size_t j = 0; j < w; ++j) {
        const uint32_t word = Wi[(j * ng + g) * kLutRows + r];
        for (size_t s = 0; s < 6; ++s) sum[s & 1] += tab[(6 * j + s) * 32 + ((word >> (5 * s)) & 31u)];
      }
      P[g * kLutRows + r] = sum[0] + sum[1];
    }
}

}  // namespace ternary
}  // namespace bmoe
