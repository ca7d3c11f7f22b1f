// Helpers shared by the AArch64 TernaryMatMul files. Internal linkage only.
#pragma once
#include <arm_neon.h>

#include "ternary.h"

namespace bmoe {
namespace ternary {
namespace {

// The four int8 trit vectors of 16 packed bytes: t[s] byte b = trit 4b+s.
struct Trits64 {
  int8x16_t t[4];
};

inline Trits64 decode16(const uint8_t* p, uint8x16_t& bad) {
  const uint8x16_t x = vld1q_u8(p);
  bad = vorrq_u8(bad, vandq_u8(x, vshrq_n_u8(x, 1)));  // masked with 0x55 in any_bad
  const int8x16_t lut = {0, 1, -1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
  const uint8x16_t three = vdupq_n_u8(3);
  Trits64 r;
  r.t[0] = vqtbl1q_s8(lut, vandq_u8(x, three));
  r.t[1] = vqtbl1q_s8(lut, vandq_u8(vshrq_n_u8(x, 2), three));
  r.t[2] = vqtbl1q_s8(lut, vandq_u8(vshrq_n_u8(x, 4), three));
  r.t[3] = vqtbl1q_s8(lut, vshrq_n_u8(x, 6));
  return r;
}

inline bool any_bad(uint8x16_t bad) { return vmaxvq_u8(vandq_u8(bad, vdupq_n_u8(0x55))) != 0; }

}  // namespace
}  // namespace ternary
}  // namespace bmoe
