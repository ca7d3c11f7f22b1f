// ButterflyRotate kernels and the layout of the per-expert cos/sin tables.
//
// Table of one expert, P = 2^S, stage s (h = 2^s) in order:
//  * h < 16 ("expanded", one entry per element i): c[P] then g[P], with c = cos θ of
//    i's pair and g = −sin for the pair's low element, +sin for its high element, so
//    the stage is z'_i = c_i·z_i + g_i·z_{i^h} — an in-register shuffle plus FMA.
//    The four such stages act within aligned 16-element chunks and are fused per chunk.
//  * h ≥ 16 (per pair k, as in the angle tensor): c[P/2] then s[P/2].
// The transpose negates every sine. Pairs with j + h ≥ D are skipped by the kernels
// (docs/ops.md), so tables do not depend on D and rows are rotated in place.
#pragma once
#include <cstddef>
#include <cstdint>

namespace bmoe {
namespace butterfly {

constexpr size_t kChunk = 16;
constexpr size_t kExpanded = 4;  // stages with h < kChunk

inline size_t stage_floats(size_t s, size_t P) { return (size_t{1} << s) < kChunk ? 2 * P : P; }
inline size_t stage_offset(size_t s, size_t P) {
  size_t off = 0;
  for (size_t i = 0; i < s; ++i) off += stage_floats(i, P);
  return off;
}
inline size_t table_floats(size_t S, size_t P) { return stage_offset(S, P); }

// Rotates one row z[0..D) in place by B(θ) (transpose = false) or B(θ)ᵀ.
using RotateFn = void (*)(float* z, size_t D, size_t S, const float* table, bool transpose);

void rotate_scalar(float*, size_t, size_t, const float*, bool);
#if defined(__x86_64__) || defined(__i386__)
void rotate_avx2(float*, size_t, size_t, const float*, bool);
void rotate_avx512(float*, size_t, size_t, const float*, bool);
#endif
#if defined(__aarch64__)
void rotate_neon(float*, size_t, size_t, const float*, bool);
#endif

// Rotation of pair (j, j+h) at stage s; `sn` already carries the direction's sign.
static inline void rotate_pair(float* z, size_t j, size_t h, float c, float sn) {
  const float lo = z[j], hi = z[j + h];
  z[j] = c * lo - sn * hi;
  z[j + h] = sn * lo + c * hi;
}

// Expanded stages of the 16-element chunk at i0 for a chunk that reaches past D
// (or past P < 16): element-wise, skipping pairs with j + h >= D.
static inline void expanded_chunk_scalar(float* z, size_t D, size_t S, const float* table, bool transpose,
                                         size_t i0) {
  const size_t P = size_t{1} << S, ns = S < kExpanded ? S : kExpanded;
  for (size_t n = 0; n < ns; ++n) {
    const size_t s = transpose ? ns - 1 - n : n, h = size_t{1} << s;
    const float* c = table + stage_offset(s, P);
    const float* g = c + P;
    for (size_t j = i0; j < i0 + kChunk && j + h < D; ++j)
      if (!(j & h)) rotate_pair(z, j, h, c[j], transpose ? -g[j + h] : g[j + h]);
  }
}

// Pair stage s over the valid pairs: calls vec(j, k, len) for runs of `len`
// consecutive pairs (j.., k..), len a multiple of `width`, and rotate_pair for the rest.
template <class Vec>
static inline void pair_stage(float* z, size_t D, size_t S, size_t s, const float* table, bool transpose,
                              size_t width, Vec&& vec) {
  const size_t P = size_t{1} << S, h = size_t{1} << s;
  const float* c = table + stage_offset(s, P);
  const float* sn = c + P / 2;
  for (size_t b0 = 0; b0 + h < D; b0 += 2 * h) {
    const size_t len = D - h - b0 < h ? D - h - b0 : h, full = len / width * width, k0 = b0 / 2;
    if (full) vec(b0, k0, full);
    for (size_t i = full; i < len; ++i) rotate_pair(z, b0 + i, h, c[k0 + i], transpose ? -sn[k0 + i] : sn[k0 + i]);
  }
}

}  // namespace butterfly
}  // namespace bmoe
