// TernaryMatMul int8 path with AVX-512 VNNI: vpdpbusd multiplies the t+1 bytes
// by the int8 activations and accumulates into int32 in one instruction. Decode (small M): one pass over
// each row of W for up to 8 rows of A. Prefill (M ≥ kGemmMinM): a GEMM on decoded panels of W.
#include <algorithm>
#include <cstring>

#include "ternary_avx512.h"

namespace bmoe {
namespace ternary {
namespace {

// Weights from DRAM at decode: the hardware prefetcher alone leaves the row loop waiting on loads. Rows follow
// each other, so running past a row's end prefetches the next one's start. The digit-row kernel prefetches into
// L2 (T1): a T0 prefetch holds one of a core's few L1 fill buffers for the whole DRAM latency.
constexpr size_t kPrefetchBytes = 8192;

template <int R>
void rows_vnni(const int8_t* Q, const float* qscale, const int32_t* qsum, size_t Kp, const uint8_t* row, size_t Kb,
               float sc, float* Y, size_t ldy, __m512i& bad) {
  constexpr int NA = R == 1 ? 4 : R == 2 ? 2 : 1;  // independent accumulators to hide vpdpbusd latency
  __m512i acc[R][NA];
  for (int m = 0; m < R; ++m)
    for (int j = 0; j < NA; ++j) acc[m][j] = _mm512_setzero_si512();
  alignas(64) uint8_t buf[64];
  for (size_t c = 0; c < Kp / kQChunk; ++c) {
    _mm_prefetch(reinterpret_cast<const char*>(row + 64 * c + kPrefetchBytes), _MM_HINT_T0);
    const __m512i x = _mm512_loadu_si512(chunk_ptr(row, c, Kb, buf, 64));
    bad = flag_bad64(bad, x);
    for (int s = 0; s < 4; ++s) {
      const __m512i u = decode_u8(x, s);
      for (int m = 0; m < R; ++m)
        acc[m][s % NA] = _mm512_dpbusd_epi32(acc[m][s % NA], u, _mm512_loadu_si512(Q + m * Kp + c * kQChunk + 64 * s));
    }
  }
  for (int m = 0; m < R; ++m) {
    for (int j = 1; j < NA; ++j) acc[m][0] = _mm512_add_epi32(acc[m][0], acc[m][j]);
    Y[m * ldy] = qscale[m] * sc * static_cast<float>(minus_qsum(hsum_epi32(acc[m][0]), qsum[m]));
  }
}

// ---- Decode on digit rows (ternary.h): plane s of a 64-byte chunk is x & (3 << 2s) = d · 4^s, straight into
// vpdpbusd (no shift, no lookup, no code check: 2 instructions per 64 trits and row of A). acc[.][s] holds
// 4^s · Σ d·q exactly while a span lasts, so an arithmetic shift by 2s recovers Σ d·q.
constexpr size_t kSpanChunks = 8192;  // |acc + acc2 lane| ≤ 8192 · 2 · 4 · 128 · 127 < 2^31 (R = 1: both hold chunks)

// acc[.][s] += plane s of chunk c against each row of Q.
template <int R>
__attribute__((always_inline)) inline void digits_chunk(const int8_t* Q, size_t Kp, const uint8_t* row, size_t c,
                                                        __m512i (&acc)[R][4]) {
  _mm_prefetch(reinterpret_cast<const char*>(row + 64 * c + kPrefetchBytes), _MM_HINT_T1);
  const __m512i x = _mm512_loadu_si512(row + 64 * c);
  for (int s = 0; s < 4; ++s) {
    const __m512i v = _mm512_and_si512(x, _mm512_set1_epi8(static_cast<char>(3 << (2 * s))));
    for (int m = 0; m < R; ++m)
      acc[m][s] = _mm512_dpbusd_epi32(acc[m][s], v, _mm512_loadu_si512(Q + m * Kp + c * kQChunk + 64 * s));
  }
}

template <int R>
void rows_digits(const int8_t* Q, const float* qscale, const int32_t* qsum, size_t Kp, const uint8_t* row, float sc,
                 float* Y, size_t ldy) {
  __m512i tot[R];
  for (int m = 0; m < R; ++m) tot[m] = _mm512_setzero_si512();
  const size_t C = Kp / kQChunk;
  for (size_t c0 = 0; c0 < C; c0 += kSpanChunks) {
    const size_t c1 = std::min(C, c0 + kSpanChunks);
    // One row of A: two chunks in flight (8 accumulator chains for vpdpbusd's latency); more rows: one.
    __m512i acc[R][4], acc2[R][4];
    for (int m = 0; m < R; ++m)
      for (int s = 0; s < 4; ++s) acc[m][s] = acc2[m][s] = _mm512_setzero_si512();
    size_t c = c0;
    if constexpr (R == 1)
      for (; c + 2 <= c1; c += 2) {
        digits_chunk<R>(Q, Kp, row, c, acc);
        digits_chunk<R>(Q, Kp, row, c + 1, acc2);
      }
    for (; c < c1; ++c) digits_chunk<R>(Q, Kp, row, c, acc);
    for (int m = 0; m < R; ++m)
      for (int s = 0; s < 4; ++s)
        tot[m] = _mm512_add_epi32(tot[m], _mm512_srai_epi32(_mm512_add_epi32(acc[m][s], acc2[m][s]), 2 * s));
  }
  for (int m = 0; m < R; ++m) {
    Y[m * ldy] = qscale[m] * sc * static_cast<float>(minus_qsum(hsum_epi32(tot[m]), qsum[m]));
  }
}

// ---- Prefill: a panel of kNr = 32 rows of W × kKc trits decoded once into an L1 tile of t+1 bytes laid out
// for vpdpbusd. Step i of the panel (4 trits a row) holds two vectors, rows 0-15 and 16-31, whose dword n is
// row n's t+1 bytes for the trits whose activations are the 4 bytes Q[m, k0 + 4i .. +3] in qpos order: step
// i = 64·c + 16·s + d (chunk c, shift s, dword d) is packed bytes 4d..4d+3 of chunk c at shift 2s. An 8×32
// register-blocked kernel then broadcasts one int32 of Q per row of A and step.
constexpr size_t kGemmMinM = 8, kNr = 32, kKc = 2 * kQChunk, kSteps = kKc / 4, kMr = 8, kMc = 64;

// Trits [k0, k0 + kc) (kc: multiple of kQChunk) of the nr ≤ 32 rows at W into tile[kc / 4][2].
void decode_panel(const uint8_t* W, size_t Kb, size_t nr, size_t k0, size_t kc, __m512i* tile, __m512i& bad) {
  const __m512i lut = _mm512_broadcast_i32x4(_mm_setr_epi8(1, 2, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0));
  const __m512i three = _mm512_set1_epi8(3);
  const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32(static_cast<int>(Kb)));
  for (size_t h = 0; h < 2; ++h) {
    const size_t n0 = 16 * h, cnt = nr > n0 ? std::min<size_t>(16, nr - n0) : 0;
    for (size_t c = 0; c < kc / kQChunk; ++c)
      for (size_t d = 0; d < 16; ++d) {
        // the dword at byte 4d of chunk c in each row; past a row's end: code 00, met by Q = 0
        const __m512i x = gather_row_dwords(W, Kb, rows, n0, cnt, k0 / 4 + 64 * c + 4 * d);
        bad = _mm512_ternarylogic_epi32(bad, x, _mm512_srli_epi32(x, 1), 0xF8);
        for (size_t s = 0; s < 4; ++s)
          tile[(64 * c + 16 * s + d) * 2 + h] =
              _mm512_shuffle_epi8(lut, _mm512_and_si512(_mm512_srli_epi32(x, static_cast<unsigned>(2 * s)), three));
      }
  }
}

// C[m][0..32) (+)= Σ_i tile[i] · Q[m][4i..4i+3] (int32, wrapping) for MR rows of Q; first: C starts at 0.
template <int MR>
__attribute__((noinline)) void micro_8x32(const int8_t* Q, size_t ldq, const __m512i* tile, size_t steps, int32_t* C,
                                          bool first) {
  __m512i c0[MR], c1[MR];
  for (int m = 0; m < MR; ++m) {
    c0[m] = first ? _mm512_setzero_si512() : _mm512_load_si512(C + 32 * m);
    c1[m] = first ? _mm512_setzero_si512() : _mm512_load_si512(C + 32 * m + 16);
  }
  for (size_t i = 0; i < steps; ++i, tile += 2) {
    const __m512i b0 = _mm512_load_si512(tile), b1 = _mm512_load_si512(tile + 1);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      int32_t q4;
      std::memcpy(&q4, Q + m * ldq + 4 * i, 4);
      const __m512i a = _mm512_set1_epi32(q4);
      c0[m] = _mm512_dpbusd_epi32(c0[m], b0, a);
      c1[m] = _mm512_dpbusd_epi32(c1[m], b1, a);
    }
  }
  for (int m = 0; m < MR; ++m) {
    _mm512_store_si512(C + 32 * m, c0[m]);
    _mm512_store_si512(C + 32 * m + 16, c1[m]);
  }
}

bool i8_gemm(const int8_t* Q, const float* qscale, const int32_t* qsum, size_t M, size_t Kp, const uint8_t* W,
             size_t Kb, size_t N, const float* scale, float* Y, size_t ldy) {
  __m512i bad = _mm512_setzero_si512();
  alignas(64) __m512i tile[kSteps * 2];
  alignas(64) int32_t C[kMc * kNr];
  for (size_t n0 = 0; n0 < N; n0 += kNr) {
    const size_t nr = std::min(kNr, N - n0);
    for (size_t mc0 = 0; mc0 < M; mc0 += kMc) {
      const size_t mc = std::min(kMc, M - mc0);
      for (size_t k0 = 0; k0 < Kp; k0 += kKc) {
        const size_t kc = std::min(kKc, Kp - k0);
        if (mc0 == 0 || Kp > kKc) decode_panel(W + n0 * Kb, Kb, nr, k0, kc, tile, bad);  // else: still in tile
        for_row_blocks<kMr>(mc, [&](size_t m, auto MR) {
          micro_8x32<decltype(MR)::value>(Q + (mc0 + m) * Kp + k0, Kp, tile, kc / 4, C + 32 * m, k0 == 0);
        });
      }
      // Y = qscale · scale · (C − Σq), in the scalar kernel's order of float products.
      const __mmask16 m0 = static_cast<__mmask16>(nr >= 16 ? 0xFFFFu : (1u << nr) - 1);
      const __mmask16 m1 = static_cast<__mmask16>(nr >= 32 ? 0xFFFFu : nr > 16 ? (1u << (nr - 16)) - 1 : 0);
      const __m512 s0 = _mm512_maskz_loadu_ps(m0, scale + n0), s1 = _mm512_maskz_loadu_ps(m1, scale + n0 + 16);
      for (size_t m = 0; m < mc; ++m) {
        const __m512 qs = _mm512_set1_ps(qscale[mc0 + m]);
        const __m512i sum = _mm512_set1_epi32(qsum[mc0 + m]);
        float* y = Y + (mc0 + m) * ldy + n0;
        _mm512_mask_storeu_ps(y, m0, _mm512_mul_ps(_mm512_mul_ps(qs, s0),
                                                   _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_load_si512(C + 32 * m), sum))));
        _mm512_mask_storeu_ps(y + 16, m1, _mm512_mul_ps(_mm512_mul_ps(qs, s1),
                                                        _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_load_si512(C + 32 * m + 16), sum))));
      }
    }
  }
  return any_bad64(bad);
}

}  // namespace

void i8_digits_avx512vnni(const int8_t* Q, const float* qscale, const int32_t* qsum, size_t M, size_t Kp,
                          const uint8_t* D, size_t N, const float* scale, float* Y, size_t ldy) {
  const size_t Kd = Kp / 4;
  for (size_t n = 0; n < N; ++n)
    for_row_blocks<4>(M, [&](size_t m0, auto R) {
      rows_digits<decltype(R)::value>(Q + m0 * Kp, qscale + m0, qsum + m0, Kp, D + n * Kd, scale[n], Y + m0 * ldy + n,
                                      ldy);
    });
}

bool i8_avx512vnni(const int8_t* Q, const float* qscale, const int32_t* qsum, size_t M, size_t Kp,
                   const uint8_t* W, size_t Kb, size_t N, const float* scale, float* Y, size_t ldy) {
  if (M >= kGemmMinM) return i8_gemm(Q, qscale, qsum, M, Kp, W, Kb, N, scale, Y, ldy);
  __m512i bad = _mm512_setzero_si512();
  for (size_t n = 0; n < N; ++n)
    for_row_blocks<8>(M, [&](size_t m0, auto R) {
      rows_vnni<decltype(R)::value>(Q + m0 * Kp, qscale + m0, qsum + m0, Kp, W + n * Kb, Kb, scale[n],
                                    Y + m0 * ldy + n, ldy, bad);
    });
  return any_bad64(bad);
}

}  // namespace ternary
}  // namespace bmoe
