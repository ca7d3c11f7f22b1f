// Scalar reference for ButterflyRotate: the stages of docs/ops.md, pair by pair.
#include "butterfly.h"

namespace bmoe {
namespace butterfly {

void rotate_scalar(float* z, size_t D, size_t S, const float* table, bool transpose) {
  const size_t P = size_t{1} << S;
  for (size_t n = 0; n < S; ++n) {
    const size_t s = transpose ? S - 1 - n : n, h = size_t{1} << s;
    const float* c = table + stage_offset(s, P);
    for (size_t k = 0; k < P / 2; ++k) {
      const size_t j = (k >> s) << (s + 1) | (k & (h - 1));
      if (j + h >= D) continue;  // pair reaches into the padding: identity
      // expanded stages store (c, g) per element; g of the high element is +sin
      const float sn = h < kChunk ? c[P + j + h] : c[P / 2 + k];
      rotate_pair(z, j, h, h < kChunk ? c[j] : c[k], transpose ? -sn : sn);
    }
  }
}

}  // namespace butterfly
}  // namespace bmoe
