// Vectorisable cos/sin and fp16 widening for ButterflyRotate's per-call cos/sin tables.
#pragma once
#include <cstddef>
#include <cstdint>

namespace bmoe {

// c[i] = cos θ[i], s[i] = sin θ[i] in float32 (≤ ~2 ulp; NaN/Inf propagate as libm's).
void sincos_block(const float* theta, size_t n, float* c, float* s);

// out[i] = the float32 value of IEEE half h[i] (exact).
void half_to_float_block(const uint16_t* h, size_t n, float* out);

}  // namespace bmoe
