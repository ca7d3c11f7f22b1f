// TernaryMatMul kernels. Every variant reads 2-bit packed rows (docs/ops.md);
// base3 rows are converted to 2-bit by the op before they reach a kernel.
#pragma once
#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace bmoe {
namespace ternary {

// The fp32 kernels work on chunks of 64 trits (16 packed bytes), the int8 ones on
// chunks of 256 trits (64 bytes). Activations are padded with zeros to a whole
// number of chunks (Kp); a row's last partial chunk of weights is copied into a
// zeroed buffer, so no kernel reads past a row.
constexpr size_t kChunk = 64;
constexpr size_t kQChunk = 256;

// int8 activations are stored per 256-chunk in "shift-major" order: trit 4b+s of
// the chunk (packed byte b, shift 2s) sits at s*64 + b. A SIMD kernel then decodes
// 64 packed bytes with four shifts and no byte shuffling.
inline size_t qpos(size_t k) { return (k & ~size_t(255)) | ((k & 3) << 6) | ((k >> 2) & 63); }

// Y[m*ldy + n] = scale[n] * Σ_k A[m*Kp + k] * t[n, k] for m < M, n < N (Kp: multiple of kChunk).
// W holds N rows of Kb bytes. Returns true if a code 11 was read.
using F32Kernel = bool (*)(const float* A, size_t M, size_t Kp, const uint8_t* W, size_t Kb, size_t N,
                           const float* scale, float* Y, size_t ldy);

// Y[m*ldy + n] = qscale[m] * scale[n] * Σ_k Q[m*Kp + qpos(k)] * t[n, k], Σ exact in int32
// (Kp: multiple of kQChunk).
// qsum[m] = Σ_k Q[m, k] (for kernels that multiply by t+1 ∈ {0,1,2} as unsigned bytes).
using I8Kernel = bool (*)(const int8_t* Q, const float* qscale, const int32_t* qsum, size_t M, size_t Kp,
                          const uint8_t* W, size_t Kb, size_t N, const float* scale, float* Y, size_t ldy);

// Σ_k d·Q − qsum in wrapping int32 (the I8Kernel contract): Σ d·Q passes 2^31 for K near 8.5e6 while the
// difference, Σ t·Q, fits. Unsigned, because signed overflow in C++ is undefined.
inline int32_t minus_qsum(int32_t sum, int32_t qsum) {
  return static_cast<int32_t>(static_cast<uint32_t>(sum) - static_cast<uint32_t>(qsum));
}

// act_quant's row quantization (docs/ops.md) in two steps, so that the second can be split over threads:
// abs_max(a, K) = max|a[k]| (NaN skipped); then, with s = abs_max / 127 > 0, quantize_range(a, k0, k1, K, s, q)
// writes q[qpos(k)] = round(a[k] / s) clamped for k in [k0, k1) (k0, k1: multiples of 16; zeros for k ≥ K) and
// returns their sum. Bit-identical in every variant.
using AbsMax = float (*)(const float* a, size_t K);
using QuantizeRange = int32_t (*)(const float* a, size_t k0, size_t k1, size_t K, float s, int8_t* q);
constexpr size_t kQuantRange = 2048;  // activations per quantization item of the op

// fn(m0, std::integral_constant<int, R>) over rows [0, M): blocks of R = Max rows, then one block of
// the M % Max left, so register-blocked kernels get their row count as a compile-time constant.
// `static` for the same reason as chunk_ptr below.
template <int R, class Fn>
static inline void tail_row_block(size_t rows, size_t m0, Fn& fn) {
  if constexpr (R > 0) {
    if (rows == R) fn(m0, std::integral_constant<int, R>());
    else tail_row_block<R - 1>(rows, m0, fn);
  }
}

template <int Max, class Fn>
static inline void for_row_blocks(size_t M, Fn&& fn) {
  size_t m = 0;
  for (; m + Max <= M; m += Max) fn(m, std::integral_constant<int, Max>());
  tail_row_block<Max - 1>(M - m, m, fn);
}

// Pointer to the `bytes` bytes of chunk c of a row; the row's last partial chunk
// is copied into `buf` and zero-padded. `static`: SIMD files are built with other
// -m flags and must not share (ODR-merge) a copy of this with generic code.
static inline const uint8_t* chunk_ptr(const uint8_t* row, size_t c, size_t Kb, uint8_t* buf, size_t bytes = 16) {
  const size_t off = c * bytes;
  if (off + bytes <= Kb) return row + off;
  for (size_t i = 0; i < bytes; ++i) buf[i] = off + i < Kb ? row[off + i] : 0;
  return buf;
}

// ---- Exact fp32 at small M with a constant W: table lookups over trit triples (T-MAC style).
// At kernel creation a constant W is repacked ("LUT layout"): rows in groups of kLutRows = 16; trits k = 3i, 3i+1,
// 3i+2 of a row form the base-3 index d0 + 3·d1 + 9·d2 (d = t + 1, 0…26), six indices per dword (bits 5s…5s+4
// hold triple 6j+s), J = ceil(K / 18) dword columns. The columns are stored in K blocks of kLutJb = 32 (the last
// one w = J − 32·(B−1) wide), block after block; a block holds its groups in items of kLutItem = 4 (the last item
// of a block nc ≤ 4 groups), item after item; inside an item, column after column, each column the nc groups'
// 16 rows' dwords: word (b, g, j, r) at lut_word(J, G, b, g, j, r). An item's 4 cache lines of a column are
// adjacent, and a run of items, across blocks too, is one sequential stream; a block's 24 KiB of tables stays in
// L1 while a thread walks any number of its items.
// Trits past K and rows past N hold index 13 (all zero).
// Per call, row of A and block, table tab[(6j+s)·32 + i] = Σ_c t_c(i)·a[18(32b+j) + 3s + c] for i < 27 (partial
// sums in a fixed order, zero trits skipped), 0 for i ≥ 27; each index is then one lookup.
constexpr size_t kLutRows = 16, kLutK = 18, kLutJb = 32, kLutItem = 4;
inline size_t lut_cols(size_t K) { return (K + kLutK - 1) / kLutK; }  // J
inline size_t lut_groups(size_t N) { return (N + kLutRows - 1) / kLutRows; }
inline size_t lut_blocks(size_t J) { return (J + kLutJb - 1) / kLutJb; }
inline size_t lut_width(size_t J, size_t b) { return J - b * kLutJb < kLutJb ? J - b * kLutJb : kLutJb; }
inline size_t lut_block_word(size_t G, size_t b) { return b * kLutJb * G * kLutRows; }  // first word of block b
inline size_t lut_items(size_t G) { return (G + kLutItem - 1) / kLutItem; }  // items per block
inline size_t lut_word(size_t J, size_t G, size_t b, size_t g, size_t j, size_t r) {
  const size_t c = g / kLutItem, nc = G - c * kLutItem < kLutItem ? G - c * kLutItem : kLutItem;
  return lut_block_word(G, b) + c * kLutItem * lut_width(J, b) * kLutRows + (j * nc + g % kLutItem) * kLutRows + r;
}

// tab (6·w·32 floats) for the w columns of activations a[0..18·w) (caller zero-pads past K).
using LutTables = void (*)(const float* a, size_t w, float* tab);
// P[16g + r] = Σ_j,s tab[(6j+s)·32 + index(g, j, s, r)] for the ng ≤ kLutItem groups of one item of a block of
// width w (Wi: the item's first word). Summation order, the same in every variant (so they give the same bits):
// the even-s and the odd-s terms in increasing (j, s) order into two sums from 0, then added. The op adds the
// blocks' P in increasing b.
using LutKernel = void (*)(const float* tab, size_t w, const uint32_t* Wi, size_t ng, float* P);

// ---- act_quant at small M with a constant W: "digit rows". At kernel creation a constant W is repacked with each
// trit's 2-bit code replaced by its digit d = t + 1 (0, 1, 2; same bit positions), rows padded with digit 0 to
// digit_row_bytes(K) bytes (whole 256-trit chunks, met by Q = 0). A byte masked with 3 << 2s is then d · 4^s, a
// valid unsigned multiplier, so a kernel needs one AND per 64 trits where 2-bit codes need a shift and a lookup.
// Same contract as I8Kernel (Σ_k d·Q − qsum = Σ_k t·Q, exact in wrapping int32; same bits), W = digit rows.
constexpr size_t kDigitsMaxM = 7;  // from 8 rows of A the int8 GEMM (decoding panels once for all rows) wins
inline size_t digit_row_bytes(size_t K) { return (K + kQChunk - 1) / kQChunk * (kQChunk / 4); }
using I8Digits = void (*)(const int8_t* Q, const float* qscale, const int32_t* qsum, size_t M, size_t Kp,
                          const uint8_t* D, size_t N, const float* scale, float* Y, size_t ldy);

struct Kernels {
  F32Kernel f32;
  I8Kernel i8;
  LutTables lut_tables;  // nullptr: the variant has no LUT path
  LutKernel lut;
  AbsMax abs_max;
  QuantizeRange quantize_range;
  I8Digits i8_digits;  // nullptr: the variant has no digit-row path (act_quant then reads the 2-bit rows)
};

float abs_max_scalar(const float*, size_t);
int32_t quantize_range_scalar(const float*, size_t, size_t, size_t, float, int8_t*);

void lut_tables_scalar(const float*, size_t, float*);
void lut_scalar(const float*, size_t, const uint32_t*, size_t, float*);

void i8_digits_scalar(const int8_t*, const float*, const int32_t*, size_t, size_t, const uint8_t*, size_t, const float*,
                      float*, size_t);
bool f32_scalar(const float*, size_t, size_t, const uint8_t*, size_t, size_t, const float*, float*, size_t);
bool i8_scalar(const int8_t*, const float*, const int32_t*, size_t, size_t, const uint8_t*, size_t, size_t,
               const float*, float*, size_t);
#if defined(__x86_64__) || defined(__i386__)
bool f32_avx2(const float*, size_t, size_t, const uint8_t*, size_t, size_t, const float*, float*, size_t);
bool i8_avx2(const int8_t*, const float*, const int32_t*, size_t, size_t, const uint8_t*, size_t, size_t,
             const float*, float*, size_t);
bool f32_avx512(const float*, size_t, size_t, const uint8_t*, size_t, size_t, const float*, float*, size_t);
float abs_max_avx512(const float*, size_t);
int32_t quantize_range_avx512(const float*, size_t, size_t, size_t, float, int8_t*);
void lut_tables_avx512(const float*, size_t, float*);
void lut_avx512(const float*, size_t, const uint32_t*, size_t, float*);
bool i8_avx512(const int8_t*, const float*, const int32_t*, size_t, size_t, const uint8_t*, size_t, size_t,
               const float*, float*, size_t);
bool i8_avx512vnni(const int8_t*, const float*, const int32_t*, size_t, size_t, const uint8_t*, size_t, size_t,
                   const float*, float*, size_t);
void i8_digits_avx512vnni(const int8_t*, const float*, const int32_t*, size_t, size_t, const uint8_t*, size_t,
                          const float*, float*, size_t);
#endif
#if defined(__aarch64__)
bool f32_neon(const float*, size_t, size_t, const uint8_t*, size_t, size_t, const float*, float*, size_t);
bool i8_neon(const int8_t*, const float*, const int32_t*, size_t, size_t, const uint8_t*, size_t, size_t,
             const float*, float*, size_t);
bool i8_dotprod(const int8_t*, const float*, const int32_t*, size_t, size_t, const uint8_t*, size_t, size_t,
                const float*, float*, size_t);
#endif

}  // namespace ternary
}  // namespace bmoe
