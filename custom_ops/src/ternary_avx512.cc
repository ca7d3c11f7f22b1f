// TernaryMatMul, AVX-512 (F/BW/DQ/VL). fp32: trits → ±1.0f in registers
// (variable shift + 16-entry vpermps table), FMA into up to 8 rows of A at once
// so one decode serves 8 rows. int8 (no VNNI): trits → t+1 ∈ {0,1,2} bytes,
// vpmaddubsw against int8 activations, Σq subtracted at the end.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "ternary.h"
#include "ternary_avx512.h"

namespace bmoe {
namespace ternary {
namespace {

// Decodes the 16 trits of packed dword `w` into floats {0, +1, -1}.
inline __m512 decode16(int32_t w) {
  const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  // vpermps reads the low 4 bits: this trit's code plus the next one's, hence the table repeats.
  const __m512 lut = _mm512_setr_ps(0, 1, -1, 0, 0, 1, -1, 0, 0, 1, -1, 0, 0, 1, -1, 0);
  return _mm512_permutexvar_ps(_mm512_srlv_epi32(_mm512_set1_epi32(w), shifts), lut);
}

template <int R>  // rows of A sharing one decode
void rows_f32(const float* A, size_t Kp, const uint8_t* row, size_t Kb, float s, float* Y, size_t ldy,
              __m128i& bad) {
  constexpr int NA = R == 1 ? 4 : R == 2 ? 2 : 1;  // independent accumulators to hide FMA latency
  __m512 acc[R][NA];
  for (int m = 0; m < R; ++m)
    for (int j = 0; j < NA; ++j) acc[m][j] = _mm512_setzero_ps();
  alignas(16) uint8_t buf[16];
  for (size_t c = 0; c < Kp / kChunk; ++c) {
    const uint8_t* p = chunk_ptr(row, c, Kb, buf);
    bad = flag_bad(bad, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    for (int d = 0; d < 4; ++d) {
      int32_t w;
      std::memcpy(&w, p + 4 * d, 4);
      const __m512 t = decode16(w);
      for (int m = 0; m < R; ++m)
        acc[m][d % NA] = _mm512_fmadd_ps(_mm512_loadu_ps(A + m * Kp + c * kChunk + d * 16), t, acc[m][d % NA]);
    }
  }
  for (int m = 0; m < R; ++m) {
    for (int j = 1; j < NA; ++j) acc[m][0] = _mm512_add_ps(acc[m][0], acc[m][j]);
    Y[m * ldy] = s * _mm512_reduce_add_ps(acc[m][0]);
  }
}

template <int R>
void rows_i8(const int8_t* Q, const float* qscale, const int32_t* qsum, size_t Kp, const uint8_t* row, size_t Kb,
             float sc, float* Y, size_t ldy, __m512i& bad) {
  const __m512i ones = _mm512_set1_epi16(1);
  __m512i acc[R];
  for (int m = 0; m < R; ++m) acc[m] = _mm512_setzero_si512();
  alignas(64) uint8_t buf[64];
  for (size_t c = 0; c < Kp / kQChunk; ++c) {
    const __m512i x = _mm512_loadu_si512(chunk_ptr(row, c, Kb, buf, 64));
    bad = flag_bad64(bad, x);
    for (int s = 0; s < 4; ++s) {
      const __m512i u = decode_u8(x, s);
      for (int m = 0; m < R; ++m) {
        const __m512i q = _mm512_loadu_si512(Q + m * Kp + c * kQChunk + 64 * s);
        // |u·q| pair sums ≤ 2·2·127: no int16 saturation.
        acc[m] = _mm512_add_epi32(acc[m], _mm512_madd_epi16(_mm512_maddubs_epi16(u, q), ones));
      }
    }
  }
  for (int m = 0; m < R; ++m)
    Y[m * ldy] = qscale[m] * sc * static_cast<float>(_mm512_reduce_add_epi32(acc[m]) - qsum[m]);
}

// ---- Exact fp32, M ≥ kGemmMinM: GEMM micro-kernel on a decoded panel.
// A panel of 32 rows of W × kKc trits is decoded once into an L1 tile of ±1/0 floats,
// tile[k][32] (16 rows' dwords gathered, then shift + vpermps per trit), and an
// 8×32 register-blocked outer-product kernel runs over all rows of A on it.
constexpr size_t kGemmMinM = 3, kNr = 32, kKc = 128, kMr = 8;

// Trits [k0, k0 + kc) (kc: multiple of 16) of the nr ≤ 32 rows at W into tile; rows ≥ nr are 0.
void decode_panel(const uint8_t* W, size_t Kb, size_t nr, size_t k0, size_t kc, float* tile, __m512i& bad) {
  const __m512 lut = _mm512_setr_ps(0, 1, -1, 0, 0, 1, -1, 0, 0, 1, -1, 0, 0, 1, -1, 0);
  const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32(static_cast<int>(Kb)));
  for (size_t h = 0; h < 2; ++h) {
    const size_t n0 = 16 * h, cnt = nr > n0 ? std::min<size_t>(16, nr - n0) : 0;
    const __mmask16 live = static_cast<__mmask16>((1u << cnt) - 1);
    for (size_t g = 0; g < kc / 16; ++g) {
      const size_t off = (k0 + 16 * g) / 4;  // byte offset of the 16 trits in each row
      __m512i x = _mm512_setzero_si512();
      if (cnt == 0 || off >= Kb) {
      } else if (off + 4 <= Kb) {
        x = _mm512_mask_i32gather_epi32(x, live, rows, W + n0 * Kb + off, 1);
      } else {  // the row's last partial dword: zero-filled
        alignas(64) uint32_t d[16] = {};
        for (size_t r = 0; r < cnt; ++r) std::memcpy(&d[r], W + (n0 + r) * Kb + off, Kb - off);
        x = _mm512_load_si512(d);
      }
      bad = _mm512_ternarylogic_epi32(bad, x, _mm512_srli_epi32(x, 1), 0xF8);
      float* t = tile + 16 * g * kNr + n0;
#define BMOE_DECODE(i) _mm512_store_ps(t + (i) * kNr, _mm512_permutexvar_ps(_mm512_srli_epi32(x, 2 * (i)), lut));
      BMOE_DECODE(0) BMOE_DECODE(1) BMOE_DECODE(2) BMOE_DECODE(3) BMOE_DECODE(4) BMOE_DECODE(5) BMOE_DECODE(6)
      BMOE_DECODE(7) BMOE_DECODE(8) BMOE_DECODE(9) BMOE_DECODE(10) BMOE_DECODE(11) BMOE_DECODE(12)
      BMOE_DECODE(13) BMOE_DECODE(14) BMOE_DECODE(15)
#undef BMOE_DECODE
    }
  }
}

// C[m][0..32) (+)= Σ_k A[m][k] · tile[k][·] for MR rows; first: C starts at 0; last: × scale.
template <int MR>
__attribute__((noinline)) void micro_8x32(const float* A, size_t lda, const float* tile, size_t kc, float* C,
                                          size_t ldc, __mmask16 m0, __mmask16 m1, bool first, bool last,
                                          const float* scale) {
  __m512 c0[MR], c1[MR];
  for (int m = 0; m < MR; ++m) {
    c0[m] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m0, C + m * ldc);
    c1[m] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m1, C + m * ldc + 16);
  }
  const float* b = tile;
  const float* a = A;
  for (size_t k = 0; k < kc; ++k, b += kNr, ++a) {
    const __m512 b0 = _mm512_load_ps(b), b1 = _mm512_load_ps(b + 16);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m512 av = _mm512_set1_ps(a[m * lda]);
      c0[m] = _mm512_fmadd_ps(av, b0, c0[m]);
      c1[m] = _mm512_fmadd_ps(av, b1, c1[m]);
    }
  }
  const __m512 s0 = last ? _mm512_maskz_loadu_ps(m0, scale) : _mm512_set1_ps(1.f);
  const __m512 s1 = last ? _mm512_maskz_loadu_ps(m1, scale + 16) : _mm512_set1_ps(1.f);
  for (int m = 0; m < MR; ++m) {
    _mm512_mask_storeu_ps(C + m * ldc, m0, _mm512_mul_ps(c0[m], s0));
    _mm512_mask_storeu_ps(C + m * ldc + 16, m1, _mm512_mul_ps(c1[m], s1));
  }
}

bool f32_gemm(const float* A, size_t M, size_t Kp, const uint8_t* W, size_t Kb, size_t N, const float* scale,
              float* Y, size_t ldy) {
  __m512i bad = _mm512_setzero_si512();
  alignas(64) float tile[kKc * kNr];
  for (size_t n0 = 0; n0 < N; n0 += kNr) {
    const size_t nr = std::min(kNr, N - n0);
    const __mmask16 m0 = static_cast<__mmask16>(nr >= 16 ? 0xFFFFu : (1u << nr) - 1);
    const __mmask16 m1 = static_cast<__mmask16>(nr >= 32 ? 0xFFFFu : nr > 16 ? (1u << (nr - 16)) - 1 : 0);
    for (size_t k0 = 0; k0 < Kp; k0 += kKc) {
      const size_t kc = std::min(kKc, Kp - k0);
      decode_panel(W + n0 * Kb, Kb, nr, k0, kc, tile, bad);
      const bool first = k0 == 0, last = k0 + kc == Kp;
      for_row_blocks<kMr>(M, [&](size_t m, auto MR) {
        micro_8x32<decltype(MR)::value>(A + m * Kp + k0, Kp, tile, kc, Y + m * ldy + n0, ldy, m0, m1, first, last,
                                        scale + n0);
      });
    }
  }
  return _mm512_test_epi32_mask(bad, _mm512_set1_epi32(0x55555555)) != 0;
}

// ---- Exact fp32 LUT path (ternary.h): per triple, vpermt2ps over its 32-entry table.
template <int h, int c, int d>
constexpr __mmask16 lut_mask() {  // lanes i of half h whose triple digit c is d
  unsigned m = 0;
  for (int i = 0; i < 16; ++i) {
    const int idx = 16 * h + i, p = c == 0 ? 1 : c == 1 ? 3 : 9;
    if (idx < 27 && idx / p % 3 == d) m |= 1u << i;
  }
  return static_cast<__mmask16>(m);
}

template <int h>
inline __m512 lut_half(const float* x) {
  __m512 e = _mm512_setzero_ps();
  e = _mm512_mask_add_ps(e, lut_mask<h, 0, 2>(), e, _mm512_set1_ps(x[0]));
  e = _mm512_mask_sub_ps(e, lut_mask<h, 0, 0>(), e, _mm512_set1_ps(x[0]));
  e = _mm512_mask_add_ps(e, lut_mask<h, 1, 2>(), e, _mm512_set1_ps(x[1]));
  e = _mm512_mask_sub_ps(e, lut_mask<h, 1, 0>(), e, _mm512_set1_ps(x[1]));
  e = _mm512_mask_add_ps(e, lut_mask<h, 2, 2>(), e, _mm512_set1_ps(x[2]));
  e = _mm512_mask_sub_ps(e, lut_mask<h, 2, 0>(), e, _mm512_set1_ps(x[2]));
  return e;
}

// Adds the raw sums over dword columns [j0, j1) of G row groups (16 rows each) starting at Wl to io[G].
template <int G>
inline void lut_groups(const float* tab, size_t J, const uint32_t* Wl, size_t j0, size_t j1, __m512* io) {
  __m512 acc[G][2];
  for (int g = 0; g < G; ++g) acc[g][0] = io[g], acc[g][1] = _mm512_setzero_ps();
  const size_t ahead = j1 - j0;  // this group's next K block: read after every other group's current one
  for (size_t j = j0; j < j1; ++j) {
    __m512i x[G];
    for (int g = 0; g < G; ++g) x[g] = _mm512_loadu_si512(Wl + (g * J + j) * kLutRows);
    if (j + ahead < J)  // DRAM-resident weights: the block runs are short, so prefetch them into L2 ourselves
      for (int g = 0; g < G; ++g)
        _mm_prefetch(reinterpret_cast<const char*>(Wl + (g * J + j + ahead) * kLutRows), _MM_HINT_T1);
    const float* t = tab + 6 * 32 * j;
#define BMOE_LUT(s)                                                                                     \
  {                                                                                                     \
    const __m512 lo = _mm512_load_ps(t + 32 * (s)), hi = _mm512_load_ps(t + 32 * (s) + 16);             \
    for (int g = 0; g < G; ++g)                                                                         \
      acc[g][(s) & 1] = _mm512_add_ps(                                                                  \
          acc[g][(s) & 1], _mm512_permutex2var_ps(lo, (s) ? _mm512_srli_epi32(x[g], 5 * (s)) : x[g], hi)); \
  }
    BMOE_LUT(0) BMOE_LUT(1) BMOE_LUT(2) BMOE_LUT(3) BMOE_LUT(4) BMOE_LUT(5)
#undef BMOE_LUT
  }
  for (int g = 0; g < G; ++g) io[g] = _mm512_add_ps(acc[g][0], acc[g][1]);
}

// Dword columns per K block: 32 · 6 tables of 128 B = 24 KB, kept in L1 while every
// block of 4 row groups of the range passes over them.
constexpr size_t kLutJb = 32, kLutMaxGroups = 64;

}  // namespace

void lut_tables_avx512(const float* a, size_t J, float* tab) {
  for (size_t tr = 0; tr < 6 * J; ++tr, tab += 32) {
    _mm512_store_ps(tab, lut_half<0>(a + 3 * tr));
    _mm512_store_ps(tab + 16, lut_half<1>(a + 3 * tr));
  }
}

void lut_avx512(const float* tab, size_t J, const uint32_t* Wl, size_t g0, size_t g1, const float* scale, size_t N,
                float* Y) {
  for (; g0 < g1; g0 += kLutMaxGroups) {
    const size_t ng = std::min(kLutMaxGroups, g1 - g0);
    __m512 acc[kLutMaxGroups];
    for (size_t i = 0; i < ng; ++i) acc[i] = _mm512_setzero_ps();
    for (size_t j0 = 0; j0 < J; j0 += kLutJb) {
      const size_t j1 = std::min(J, j0 + kLutJb);
      for (size_t i = 0; i < ng; i += 4) {
        const uint32_t* w = Wl + (g0 + i) * J * kLutRows;
        switch (std::min<size_t>(4, ng - i)) {
          case 4: lut_groups<4>(tab, J, w, j0, j1, acc + i); break;
          case 3: lut_groups<3>(tab, J, w, j0, j1, acc + i); break;
          case 2: lut_groups<2>(tab, J, w, j0, j1, acc + i); break;
          default: lut_groups<1>(tab, J, w, j0, j1, acc + i); break;
        }
      }
    }
    for (size_t i = 0; i < ng; ++i) {
      const size_t n = (g0 + i) * kLutRows, live = std::min<size_t>(kLutRows, N - n);
      const __mmask16 m = static_cast<__mmask16>((1u << live) - 1);
      _mm512_mask_storeu_ps(Y + n, m, _mm512_mul_ps(acc[i], _mm512_maskz_loadu_ps(m, scale + n)));
    }
  }
}

bool f32_avx512(const float* A, size_t M, size_t Kp, const uint8_t* W, size_t Kb, size_t N, const float* scale,
                float* Y, size_t ldy) {
  if (M >= kGemmMinM) return f32_gemm(A, M, Kp, W, Kb, N, scale, Y, ldy);
  __m128i bad = _mm_setzero_si128();
  for (size_t n = 0; n < N; ++n)
    for_row_blocks<8>(M, [&](size_t m0, auto R) {
      rows_f32<decltype(R)::value>(A + m0 * Kp, Kp, W + n * Kb, Kb, scale[n], Y + m0 * ldy + n, ldy, bad);
    });
  return any_bad(bad);
}

bool i8_avx512(const int8_t* Q, const float* qscale, const int32_t* qsum, size_t M, size_t Kp, const uint8_t* W,
               size_t Kb, size_t N, const float* scale, float* Y, size_t ldy) {
  __m512i bad = _mm512_setzero_si512();
  for (size_t n = 0; n < N; ++n)
    for_row_blocks<8>(M, [&](size_t m0, auto R) {
      rows_i8<decltype(R)::value>(Q + m0 * Kp, qscale + m0, qsum + m0, Kp, W + n * Kb, Kb, scale[n],
                                  Y + m0 * ldy + n, ldy, bad);
    });
  return any_bad64(bad);
}

}  // namespace ternary
}  // namespace bmoe
