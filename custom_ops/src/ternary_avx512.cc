// TernaryMatMul, AVX-512 (F/BW/DQ/VL). fp32: trits → ±1.0f in registers
// (variable shift + 16-entry vpermps table), FMA into up to 8 rows of A at once
// so one decode serves 8 rows. int8 (no VNNI): trits → t+1 ∈ {0,1,2} bytes,
// vpmaddubsw against int8 activations, Σq subtracted at the end. Exact fp32 at small M with a constant W: the LUT
// path (ternary.h), one permute per trit triple of 16 rows.
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
    Y[m * ldy] = qscale[m] * sc * static_cast<float>(minus_qsum(hsum_epi32(acc[m]), qsum[m]));
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
    for (size_t g = 0; g < kc / 16; ++g) {
      const __m512i x = gather_row_dwords(W, Kb, rows, n0, cnt, (k0 + 16 * g) / 4);  // the 16 trits in each row
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

template <int h, int c>
inline __m512 lut_signs() {  // lane i: the trit (digit − 1) that digit c of index 16h + i stands for
  return _mm512_mask_mov_ps(_mm512_maskz_mov_ps(lut_mask<h, c, 2>(), _mm512_set1_ps(1.f)), lut_mask<h, c, 0>(),
                            _mm512_set1_ps(-1.f));
}

template <int h>
inline __m512 lut_half(const float* x) {
  // Per digit c one masked FMA: ±1 · x[c] + e is exactly e ± x[c] rounded once (as lut_tables_scalar's add or
  // subtract), and lanes whose digit is 1 (a zero trit) are skipped.
  __m512 e = _mm512_setzero_ps();
  e = _mm512_mask3_fmadd_ps(lut_signs<h, 0>(), _mm512_set1_ps(x[0]), e, lut_mask<h, 0, 0>() | lut_mask<h, 0, 2>());
  e = _mm512_mask3_fmadd_ps(lut_signs<h, 1>(), _mm512_set1_ps(x[1]), e, lut_mask<h, 1, 0>() | lut_mask<h, 1, 2>());
  e = _mm512_mask3_fmadd_ps(lut_signs<h, 2>(), _mm512_set1_ps(x[2]), e, lut_mask<h, 2, 0>() | lut_mask<h, 2, 2>());
  return e;
}

// The sums of the NG groups of one item (ternary.h) of a block of width w, in lut_scalar's order, into
// P[16g..16g+16). An item's column is NG adjacent lines, and items follow each other: the weights are one
// sequential stream, prefetched kLutAhead bytes ahead (the hardware prefetcher alone leaves the loop waiting on
// DRAM).
constexpr size_t kLutAhead = 12288;

template <int NG>
inline void lut_item(const float* tab, size_t w, const uint32_t* Wi, float* P) {
  __m512 acc[NG][2];
  for (int g = 0; g < NG; ++g) acc[g][0] = acc[g][1] = _mm512_setzero_ps();
  for (size_t j = 0; j < w; ++j, tab += 6 * 32, Wi += NG * kLutRows) {
    __m512i x[NG];
    for (int g = 0; g < NG; ++g) {
      x[g] = _mm512_loadu_si512(Wi + g * kLutRows);
      asm("" : "+v"(x[g]));  // keep x in a register: folding the load into each shift re-reads it 6 times
      _mm_prefetch(reinterpret_cast<const char*>(Wi + g * kLutRows) + kLutAhead, _MM_HINT_T1);
    }
#define BMOE_LUT(s)                                                                                     \
  {                                                                                                     \
    const __m512 lo = _mm512_load_ps(tab + 32 * (s)), hi = _mm512_load_ps(tab + 32 * (s) + 16);         \
    for (int g = 0; g < NG; ++g)                                                                        \
      acc[g][(s) & 1] = _mm512_add_ps(                                                                  \
          acc[g][(s) & 1], _mm512_permutex2var_ps(lo, (s) ? _mm512_srli_epi32(x[g], 5 * (s)) : x[g], hi)); \
  }
    BMOE_LUT(0) BMOE_LUT(1) BMOE_LUT(2) BMOE_LUT(3) BMOE_LUT(4) BMOE_LUT(5)
#undef BMOE_LUT
  }
  for (int g = 0; g < NG; ++g) _mm512_storeu_ps(P + kLutRows * g, _mm512_add_ps(acc[g][0], acc[g][1]));
}

}  // namespace

void lut_tables_avx512(const float* a, size_t J, float* tab) {
  for (size_t tr = 0; tr < 6 * J; ++tr, tab += 32) {
    _mm512_store_ps(tab, lut_half<0>(a + 3 * tr));
    _mm512_store_ps(tab + 16, lut_half<1>(a + 3 * tr));
  }
}

void lut_avx512(const float* tab, size_t w, const uint32_t* Wi, size_t ng, float* P) {
  switch (ng) {
    case 4: lut_item<4>(tab, w, Wi, P); break;
    case 3: lut_item<3>(tab, w, Wi, P); break;
    case 2: lut_item<2>(tab, w, Wi, P); break;
    default: lut_item<1>(tab, w, Wi, P); break;
  }
}

float abs_max_avx512(const float* a, size_t K) {
  const __m512 sign = _mm512_set1_ps(-0.f);
  __m512 mx = _mm512_setzero_ps();
  size_t i = 0;
  for (; i + 16 <= K; i += 16) mx = _mm512_max_ps(_mm512_andnot_ps(sign, _mm512_loadu_ps(a + i)), mx);  // NaN: keeps mx
  const __mmask16 tail = static_cast<__mmask16>((1u << (K - i)) - 1);
  mx = _mm512_max_ps(_mm512_andnot_ps(sign, _mm512_maskz_loadu_ps(tail, a + i)), mx);
  return _mm512_reduce_max_ps(mx);
}

int32_t quantize_range_avx512(const float* a, size_t k0, size_t k1, size_t K, float scale, int8_t* q) {
  const __m512 sign = _mm512_set1_ps(-0.f), s = _mm512_set1_ps(scale), lo = _mm512_set1_ps(-127.f),
               hi = _mm512_set1_ps(127.f);
  const __m128i by_shift = _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  __m512i sum = _mm512_setzero_si512();
  for (size_t i = k0; i < k1; i += 16) {  // 16 trits = packed bytes 4u..4u+3 of a chunk: 4 bytes at each shift plane
    const __mmask16 m = i >= K ? 0 : K - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (K - i)) - 1);
    // As quantize_range_scalar: v = a / s (exact division), NaN → −127 (max returns its second operand), clamp,
    // then round half away from zero: trunc(v) plus ±1 where |v − trunc(v)| ≥ 0.5 (all exact).
    __m512 v = _mm512_div_ps(_mm512_maskz_loadu_ps(m, a + i), s);
    v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
    const __m512 t = _mm512_roundscale_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    const __mmask16 up = _mm512_cmp_ps_mask(_mm512_andnot_ps(sign, _mm512_sub_ps(v, t)), _mm512_set1_ps(0.5f), _CMP_GE_OQ);
    const __m512i r = _mm512_cvttps_epi32(_mm512_mask_add_ps(t, up, t, _mm512_or_ps(_mm512_set1_ps(1.f), _mm512_and_ps(sign, v))));
    sum = _mm512_add_epi32(sum, r);
    const __m128i b = _mm_shuffle_epi8(_mm512_cvtepi32_epi8(r), by_shift);
    int8_t* chunk = q + (i & ~size_t(255)) + (i & 255) / 4;
    alignas(16) int32_t d[4];
    _mm_store_si128(reinterpret_cast<__m128i*>(d), b);
    for (int sh = 0; sh < 4; ++sh) std::memcpy(chunk + 64 * sh, &d[sh], 4);  // past K: zeros (masked load)
  }
  return _mm512_reduce_add_epi32(sum);
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
