// lmforge::packed_matvec: x (M, K) float32 times a packed 4-bit weight, computed in float32 throughout.
//
// PyTorch's _weight_int4pack_mm_for_cpu takes bf16 activations and scales and returns bf16: about 1/256 of a
// value at each layer's input, scales and output, which flips greedy near-ties (lmforge/cpu_kernel.py has the
// figures). This kernel reads the same packed codes (blocks of BLOCK rows stored column by column; in a block's
// column, byte j holds row j in its low nibble and row j + BLOCK/2 in its high one: PyTorch's "split" layout on
// AVX2 and AVX-512 builds) and, instead of PyTorch's bf16 (scale, zero) pairs, each group's (scale, min) as
// fp16: the values the weight was packed with (a GGUF file's fp16 scales, exactly), 4 bytes for 32 weights.
//
//   w = q * scale + min
//   out[m, n] = sum_g  scale[g, n] * (sum_{k in g} q[n, k] x[m, k])  +  min[g, n] * (sum_{k in g} x[m, k])
//
// so each weight costs one float32 FMA, and a group's scale is applied once to its 32 products. Several input
// rows (AVX-512 builds) go 4 at a time, each code converted to float once for them. int8 weights are two 4-bit
// planes (lmforge/quant.py); AVX-512 builds join each weight's nibbles into its code, elsewhere the planes are
// two 4-bit weights over [x, x]. With bf16 (a server's batch steps, built where the CPU has AVX512-BF16), x is
// rounded to bf16 and the codes multiplied in bf16 dot products instead (block_rows_64_bf16).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

constexpr int kGroup = 32;
// Codes are asked for this far ahead of the loop that reads them. Without it, within a decode step (weights
// coming from memory, not cache) SmolLM2's gate/up projection took 112 us a call against PyTorch's 84; with
// 2 KiB 77, with 4 KiB 62.
constexpr int kPrefetchBytes = 4096;

constexpr int kTile = 16;  // rows a tile of (scale, min) pairs holds (lmforge.quant.KERNEL_ROWS)

// Each group's fp16 (scale, min): a tile of 16 rows after another, and in a tile group after group, 16 scales
// then 16 mins. A block's are BLOCK/16 sweeps of G * 64 bytes.
struct Exact {
  const uint16_t* pairs;  // the block's first tile
  int64_t groups;
  // the scales of group g for rows row..row+7 (or +15) of the block; their mins follow 16 values on
  const uint16_t* at(int64_t g, int row) const {
    return pairs + 2 * kTile * ((row / kTile) * groups + g) + row % kTile;
  }
};

// Asked for at a block's start: no hardware prefetcher follows BLOCK/16 streams beside the codes'.
template <int BLOCK>
inline void prefetch_exact(Exact e) {
  for (int t = 0; t < BLOCK / kTile; ++t)
    for (int64_t byte = 0; byte < e.groups * 4 * kTile; byte += 64)
      _mm_prefetch(reinterpret_cast<const char*>(e.pairs + 2 * kTile * t * e.groups) + byte, _MM_HINT_T0);
}

// One block of BLOCK rows for one input row, in AVX2 vectors of 8 rows.
template <int BLOCK>
void block_row(const float* x, int64_t K, const uint8_t* codes, Exact e, const float* xsum, float* out) {
  constexpr int HALF = BLOCK / 16;  // vectors of 8 rows per nibble
  const __m256i low_nibble = _mm256_set1_epi32(15);
  prefetch_exact<BLOCK>(e);
  __m256 acc[2 * HALF];
  for (int i = 0; i < 2 * HALF; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t g = 0; g < K / kGroup; ++g) {
    __m256 part[2 * HALF];
    for (int i = 0; i < 2 * HALF; ++i) part[i] = _mm256_setzero_ps();
    const uint8_t* column = codes + g * kGroup * (BLOCK / 2);
    for (int k = 0; k < kGroup; ++k, column += BLOCK / 2) {
      _mm_prefetch(reinterpret_cast<const char*>(column) + kPrefetchBytes, _MM_HINT_T0);
      const __m256 xk = _mm256_broadcast_ss(x + g * kGroup + k);
      for (int i = 0; i < HALF; ++i) {
        const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(column + 8 * i)));
        part[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b, low_nibble)), xk, part[i]);
        part[HALF + i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)), xk, part[HALF + i]);
      }
    }
    const __m256 xs = _mm256_set1_ps(xsum[g]);
    for (int i = 0; i < 2 * HALF; ++i) {
      const uint16_t* scales = e.at(g, 8 * i);  // 8 rows' fp16 scales, their mins kTile values on
      const __m256 scale = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales)));
      const __m256 min = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + kTile)));
      acc[i] = _mm256_fmadd_ps(part[i], scale, _mm256_fmadd_ps(min, xs, acc[i]));
    }
  }
  for (int i = 0; i < 2 * HALF; ++i) _mm256_storeu_ps(out + 8 * i, acc[i]);
}

#ifdef __AVX512F__
// The scale and min of a group's 16 rows (fp16, the mins kTile values after the scales).
inline void scales_mins_16(const uint16_t* scales, __m512& scale, __m512& min) {
  scale = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales)));
  min = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales + kTile)));
}

// block_row<64> in vectors of 16 rows: half the instructions a weight, and two columns at a time (even and odd
// k in their own sums, so the adds of one column do not wait for the previous one's).
void block_row_64_avx512(const float* x, int64_t K, const uint8_t* codes, Exact e, const float* xsum,
                         float* out) {
  const __m512i low_nibble = _mm512_set1_epi32(15);
  prefetch_exact<64>(e);
  __m512 acc[4];
  for (int i = 0; i < 4; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < K / kGroup; ++g) {
    __m512 even[4], odd[4];
    for (int i = 0; i < 4; ++i) even[i] = odd[i] = _mm512_setzero_ps();
    const uint8_t* column = codes + g * kGroup * 32;
    for (int k = 0; k < kGroup; k += 2, column += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(column) + kPrefetchBytes, _MM_HINT_T0);
      const __m512 x0 = _mm512_set1_ps(x[g * kGroup + k]);
      const __m512 x1 = _mm512_set1_ps(x[g * kGroup + k + 1]);
      // bytes 0-15 hold rows 0-15 (low nibbles) and 32-47 (high); bytes 16-31 rows 16-31 and 48-63
      const __m512i a0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(column)));
      const __m512i a1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(column + 16)));
      const __m512i b0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(column + 32)));
      const __m512i b1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(column + 48)));
      even[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(a0, low_nibble)), x0, even[0]);
      even[1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(a1, low_nibble)), x0, even[1]);
      even[2] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(a0, 4)), x0, even[2]);
      even[3] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(a1, 4)), x0, even[3]);
      odd[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(b0, low_nibble)), x1, odd[0]);
      odd[1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(b1, low_nibble)), x1, odd[1]);
      odd[2] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(b0, 4)), x1, odd[2]);
      odd[3] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(b1, 4)), x1, odd[3]);
    }
    const __m512 xs = _mm512_set1_ps(xsum[g]);
    for (int i = 0; i < 4; ++i) {
      __m512 scale, min;
      scales_mins_16(e.at(g, 16 * i), scale, min);
      acc[i] = _mm512_fmadd_ps(_mm512_add_ps(even[i], odd[i]), scale, _mm512_fmadd_ps(min, xs, acc[i]));
    }
  }
  for (int i = 0; i < 4; ++i) _mm512_storeu_ps(out + 16 * i, acc[i]);
}

// Rows 32 half .. 32 half + 31 of an int8 column's joined codes as floats, two vectors of 16 rows (bytes 0-15
// hold rows 0-15 in their low nibbles and 32-47 in their high ones, bytes 16-31 rows 16-31 and 48-63): q = 16 hi +
// lo in 0..255, the low plane's column K columns after the high one's.
inline void column_32_int8(const uint8_t* column, int64_t K, int half, __m512 w[2]) {
  const __m512i low_nibble = _mm512_set1_epi32(15), high_nibble = _mm512_set1_epi32(0xF0);
  for (int v = 0; v < 2; ++v) {
    const __m512i a = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(column + 16 * v)));
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(column + K * 32 + 16 * v)));
    const __m512i q = half == 0 ? _mm512_or_si512(_mm512_slli_epi32(_mm512_and_si512(a, low_nibble), 4),
                                                  _mm512_and_si512(b, low_nibble))
                                : _mm512_or_si512(_mm512_and_si512(a, high_nibble), _mm512_srli_epi32(b, 4));
    w[v] = _mm512_cvtepi32_ps(q);
  }
}

// A column's 64 weights as floats, 4 vectors of 16 rows (bytes 0-15 hold rows 0-15 in their low nibbles and
// 32-47 in their high ones, bytes 16-31 rows 16-31 and 48-63). int8 weights are two 4-bit planes, joined into each
// weight's code (column_32_int8, both halves: inlined, the loads are shared), converted once, where the planes as
// two 4-bit weights took two conversions and two FMAs a row.
template <bool INT8>
inline void column_64(const uint8_t* column, int64_t K, __m512 w[4]) {
  if constexpr (INT8) {
    column_32_int8(column, K, 0, w);
    column_32_int8(column, K, 1, w + 2);
  } else {
    const __m512i low_nibble = _mm512_set1_epi32(15);
    const __m512i a0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(column)));
    const __m512i a1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(column + 16)));
    w[0] = _mm512_cvtepi32_ps(_mm512_and_si512(a0, low_nibble));
    w[1] = _mm512_cvtepi32_ps(_mm512_and_si512(a1, low_nibble));
    w[2] = _mm512_cvtepi32_ps(_mm512_srli_epi32(a0, 4));
    w[3] = _mm512_cvtepi32_ps(_mm512_srli_epi32(a1, 4));
  }
}

// R input rows (a prompt's, a server's batch) through one 64-row block: each code converted to float once and
// multiplied into R rows' sums, which live in registers through a group and in out between groups. int8 (INT8):
// K is the input's width, the codes' columns 2K; its scale is the low plane's, its min (-128 scale) the high's.
template <bool INT8, int R>
void block_rows_64_avx512(const float* x, int64_t K, const uint8_t* codes, Exact e, const float* xsum, float* out,
                          int64_t ldo) {
  const int64_t G = K / kGroup;
  prefetch_exact<64>(e);
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < 4; ++i) _mm512_storeu_ps(out + r * ldo + 16 * i, _mm512_setzero_ps());
  for (int64_t g = 0; g < G; ++g) {
    __m512 part[R][4];
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < 4; ++i) part[r][i] = _mm512_setzero_ps();
    const uint8_t* column = codes + g * kGroup * 32;
    for (int k = 0; k < kGroup; ++k, column += 32) {
      if (k % 2 == 0) {
        _mm_prefetch(reinterpret_cast<const char*>(column) + kPrefetchBytes, _MM_HINT_T0);
        if constexpr (INT8) _mm_prefetch(reinterpret_cast<const char*>(column + K * 32) + kPrefetchBytes, _MM_HINT_T0);
      }
      __m512 w[4];
      column_64<INT8>(column, K, w);
      for (int r = 0; r < R; ++r) {
        const __m512 xk = _mm512_set1_ps(x[r * K + g * kGroup + k]);
        for (int i = 0; i < 4; ++i) part[r][i] = _mm512_fmadd_ps(w[i], xk, part[r][i]);
      }
    }
    for (int i = 0; i < 4; ++i) {
      __m512 scale, min;
      scales_mins_16(e.at(g, 16 * i), scale, min);
      if constexpr (INT8) {
        __m512 zero;
        scales_mins_16(e.at(G + g, 16 * i), scale, zero);
      }
      for (int r = 0; r < R; ++r) {
        float* o = out + r * ldo + 16 * i;
        const __m512 xs = _mm512_set1_ps(xsum[r * G + g]);
        _mm512_storeu_ps(o, _mm512_fmadd_ps(part[r][i], scale, _mm512_fmadd_ps(min, xs, _mm512_loadu_ps(o))));
      }
    }
  }
}

constexpr int kRowsAtOnce = 4;

// All M rows of x, kRowsAtOnce at a time, through one 64-row block (int8: its planes joined).
template <bool INT8>
void block_many_rows_64(int64_t M, const float* x, int64_t K, const uint8_t* codes, Exact e, const float* xsum,
                        float* out, int64_t ldo) {
  const int64_t G = K / kGroup;
  for (int64_t m = 0; m < M; m += kRowsAtOnce) {
    const float* xm = x + m * K;
    const float* xs = xsum + m * G;
    float* o = out + m * ldo;
    switch (std::min<int64_t>(kRowsAtOnce, M - m)) {
      case 4: block_rows_64_avx512<INT8, 4>(xm, K, codes, e, xs, o, ldo); break;
      case 3: block_rows_64_avx512<INT8, 3>(xm, K, codes, e, xs, o, ldo); break;
      case 2: block_rows_64_avx512<INT8, 2>(xm, K, codes, e, xs, o, ldo); break;
      default: block_rows_64_avx512<INT8, 1>(xm, K, codes, e, xs, o, ldo); break;
    }
  }
}
#endif

#ifdef __AVX512BF16__
// Several input rows with bf16 dot products (vdpbf16ps: two products a lane, summed in float32), on CPUs with
// AVX512-BF16: half the multiply instructions of float32 FMAs, which bound a batch of 8 rows (a server's 8
// streams), at the cost of rounding x to bf16 (the weights are exact, below). Each 32-bit lane holds one row's
// weights at columns k and k+1, as bf16 128 + q: bf16's 7 mantissa bits count units from 128 up, so the code
// ORed into bf16 128's bits is 128 + q exactly (q < 16). The 128s come back out through each group's min:
//   sum_k (q s + m) x = s sum_k (128 + q) x + (m - 128 s) sum_k x        (x: the bf16 values, exact products)
// Interleaving columns k and k+1 (unpack, then widen bytes to 16 bits) leaves a vector's 16 lanes holding rows
// b..b+7 and b+16..b+23, with b = 0, 8, 32, 40 for its 4 vectors.
constexpr int kPairBase[4][2] = {{0, 16}, {8, 24}, {32, 48}, {40, 56}};

// the fp16 scales (or mins, at +kTile) of the 16 rows vector i holds, as floats
inline __m512 permuted_16(Exact e, int64_t g, int i, int offset) {
  const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(e.at(g, kPairBase[i][0]) + offset));
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(e.at(g, kPairBase[i][1]) + offset));
  return _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(a), b, 1));
}

// R rows of x through one 64-row block: xpairs (R, K/2) bf16 pairs (columns 2j and 2j+1 in one 32-bit value),
// xsum (R, K/32) each group's sum of those bf16 values.
template <int R>
void block_rows_64_bf16(const uint32_t* xpairs, int64_t K, const uint8_t* codes, Exact e, const float* xsum,
                        float* out, int64_t ldo) {
  const int64_t G = K / kGroup, pairs = K / 2;
  const __m512i nibble = _mm512_set1_epi16(15);
  const __m512i bf16_128 = _mm512_set1_epi16(0x4300);
  prefetch_exact<64>(e);
  alignas(64) float acc[R][4][16] = {};  // the rows' sums between groups, lanes as the vectors hold them
  for (int64_t g = 0; g < G; ++g) {
    __m512 part[R][4];
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < 4; ++i) part[r][i] = _mm512_setzero_ps();
    const uint8_t* column = codes + g * kGroup * 32;
    for (int k = 0; k < kGroup; k += 2, column += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(column) + kPrefetchBytes, _MM_HINT_T0);
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(column));
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(column + 32));
      const __m512i lo = _mm512_cvtepu8_epi16(_mm256_unpacklo_epi8(a, b));  // rows 0-7 and 16-23, k and k + 1
      const __m512i hi = _mm512_cvtepu8_epi16(_mm256_unpackhi_epi8(a, b));  // rows 8-15 and 24-31
      // (v & 15) | bf16 128, one instruction (0xEA: a & b | c)
      const __m512bh w[4] = {
          (__m512bh)_mm512_ternarylogic_epi32(lo, nibble, bf16_128, 0xEA),
          (__m512bh)_mm512_ternarylogic_epi32(hi, nibble, bf16_128, 0xEA),
          (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(lo, 4), nibble, bf16_128, 0xEA),
          (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(hi, 4), nibble, bf16_128, 0xEA)};
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const __m512bh xk = (__m512bh)_mm512_set1_epi32(static_cast<int>(xpairs[r * pairs + (g * kGroup + k) / 2]));
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) part[r][i] = _mm512_dpbf16_ps(part[r][i], w[i], xk);
      }
    }
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      const __m512 scale = permuted_16(e, g, i, 0);
      const __m512 offset = _mm512_fnmadd_ps(_mm512_set1_ps(128.f), scale, permuted_16(e, g, i, kTile));
      for (int r = 0; r < R; ++r) {
        const __m512 xs = _mm512_set1_ps(xsum[r * G + g]);
        _mm512_store_ps(acc[r][i],
                        _mm512_fmadd_ps(part[r][i], scale, _mm512_fmadd_ps(offset, xs, _mm512_load_ps(acc[r][i]))));
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < 4; ++i) {
      std::copy_n(acc[r][i], 8, out + r * ldo + kPairBase[i][0]);
      std::copy_n(acc[r][i] + 8, 8, out + r * ldo + kPairBase[i][1]);
    }
}

// int8 weights for R rows (up to 8) in bf16 dot products. A joined code (0-255) has 8 significant bits, so its
// float's high 16 bits are its bf16 exactly; one permute pairs columns k and k + 1 lane by lane, rows in order.
// A group goes over its codes twice (from L1), 32 rows at a time, so 8 rows' sums stay in 16 registers. K is the
// input's width (the codes' columns 2K); the scale is the low plane's, the min (-128 scale) the high plane's.
template <int R>
void block_rows_64_int8_bf16(const uint32_t* xpairs, int64_t K, const uint8_t* codes, Exact e, const float* xsum,
                             float* out, int64_t ldo) {
  const int64_t G = K / kGroup, pairs = K / 2;
  alignas(64) static constexpr int16_t kPairs[32] = {1,  33, 3,  35, 5,  37, 7,  39, 9,  41, 11,
                                                     43, 13, 45, 15, 47, 17, 49, 19, 51, 21, 53,
                                                     23, 55, 25, 57, 27, 59, 29, 61, 31, 63};
  const __m512i take = _mm512_load_si512(kPairs);  // element 2j: column k's bf16 of row j; 2j + 1: column k + 1's
  prefetch_exact<64>(e);
  alignas(64) float acc[R][4][16] = {};
  for (int64_t g = 0; g < G; ++g) {
#pragma GCC unroll 2
    for (int half = 0; half < 2; ++half) {
      __m512 part[R][2];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) part[r][0] = part[r][1] = _mm512_setzero_ps();
      const uint8_t* column = codes + g * kGroup * 32;
      for (int k = 0; k < kGroup; k += 2, column += 64) {
        if (half == 0) {
          _mm_prefetch(reinterpret_cast<const char*>(column) + kPrefetchBytes, _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(column + K * 32) + kPrefetchBytes, _MM_HINT_T0);
        }
        __m512 now[2], next[2];
        column_32_int8(column, K, half, now);
        column_32_int8(column + 32, K, half, next);
        __m512bh w[2];
#pragma GCC unroll 2
        for (int v = 0; v < 2; ++v)
          w[v] = (__m512bh)_mm512_permutex2var_epi16(_mm512_castps_si512(now[v]), take, _mm512_castps_si512(next[v]));
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          const __m512bh xk = (__m512bh)_mm512_set1_epi32(static_cast<int>(xpairs[r * pairs + (g * kGroup + k) / 2]));
          part[r][0] = _mm512_dpbf16_ps(part[r][0], w[0], xk);
          part[r][1] = _mm512_dpbf16_ps(part[r][1], w[1], xk);
        }
      }
#pragma GCC unroll 2
      for (int v = 0; v < 2; ++v) {
        const int i = 2 * half + v;
        __m512 scale, min, unused;
        scales_mins_16(e.at(g, 16 * i), unused, min);
        scales_mins_16(e.at(G + g, 16 * i), scale, unused);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          const __m512 xs = _mm512_set1_ps(xsum[r * G + g]);
          _mm512_store_ps(acc[r][i], _mm512_fmadd_ps(part[r][v], scale, _mm512_fmadd_ps(min, xs, _mm512_load_ps(acc[r][i]))));
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < 4; ++i) std::copy_n(acc[r][i], 16, out + r * ldo + 16 * i);
}

// R rows (r <= R: the template for exactly r) through one 64-row block in bf16 dot products.
template <bool INT8, int R>
void rows_bf16(int64_t r, const uint32_t* xpairs, int64_t K, const uint8_t* codes, Exact e, const float* xsum,
               float* out, int64_t ldo) {
  if constexpr (R > 1)
    if (r < R) return rows_bf16<INT8, R - 1>(r, xpairs, K, codes, e, xsum, out, ldo);
  if constexpr (INT8)
    block_rows_64_int8_bf16<R>(xpairs, K, codes, e, xsum, out, ldo);
  else
    block_rows_64_bf16<R>(xpairs, K, codes, e, xsum, out, ldo);
}

// All M rows through one 64-row block in bf16 dot products: int8's 8 at a time, int4's kRowsAtOnce.
template <bool INT8>
void block_many_rows_64_bf16(int64_t M, const uint32_t* xpairs, int64_t K, const uint8_t* codes, Exact e,
                             const float* xsum, float* out, int64_t ldo) {
  constexpr int kAtOnce = INT8 ? 8 : kRowsAtOnce;
  const int64_t G = K / kGroup, pairs = K / 2;
  for (int64_t m = 0; m < M; m += kAtOnce)
    rows_bf16<INT8, kAtOnce>(std::min<int64_t>(kAtOnce, M - m), xpairs + m * pairs, K, codes, e, xsum + m * G,
                             out + m * ldo, ldo);
}
#endif

// packed_matvec in bf16 dot products: x rounded to bf16 (to nearest even), each group's sum of those values, then
// every block's rows, R at a time (int8: its codes joined).
at::Tensor packed_matvec_bf16(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& exact, int64_t block,
                              int64_t rows, int64_t planes) {
#ifdef __AVX512BF16__
  TORCH_CHECK(block == 64, "bf16: blocks of 64 rows");
  const int64_t M = x.size(0), K = x.size(1), G = K / kGroup, Gc = G * planes;
  std::vector<uint16_t> xb(M * K);
  std::vector<float> xsum(M * G, 0.f);
  const float* xp = x.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) {
      const c10::BFloat16 v(xp[m * K + k]);
      xb[m * K + k] = v.x;
      xsum[m * G + k / kGroup] += static_cast<float>(v);
    }
  at::Tensor out = at::empty({M, rows}, x.options());
  const uint8_t* cp = packed.data_ptr<uint8_t>();
  const auto* ex = reinterpret_cast<const uint16_t*>(exact.data_ptr<int16_t>());
  float* op = out.data_ptr<float>();
  const auto* xpairs = reinterpret_cast<const uint32_t*>(xb.data());
  at::parallel_for(0, rows / block, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const uint8_t* codes = cp + b * block * K * planes / 2;
      const Exact e{ex + 2 * b * Gc * block, Gc};
      if (planes == 2)
        block_many_rows_64_bf16<true>(M, xpairs, K, codes, e, xsum.data(), op + b * block, rows);
      else
        block_many_rows_64_bf16<false>(M, xpairs, K, codes, e, xsum.data(), op + b * block, rows);
    }
  });
  return out;
#else
  TORCH_CHECK(false, "bf16: lmforge's kernels were built without AVX512-BF16");
  return {};
#endif
}

// x (M, K) float32; packed (>= rows, K/2) uint8; exact (>= rows/16, K/32, 2, 16): each group's fp16 (scale,
// min) as their int16 bits (what lmforge.quant stores: no dtype view per call); rows: whole blocks.
// bf16: in bf16 dot products (block_rows_64_bf16), where the library was built with AVX512-BF16.
at::Tensor packed_matvec(const at::Tensor& input, const at::Tensor& packed, const at::Tensor& exact, int64_t block,
                         int64_t rows, int64_t planes, bool bf16) {
  TORCH_CHECK(input.dim() == 2 && input.scalar_type() == at::kFloat && input.is_contiguous(),
              "x: contiguous (M, K) float32");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous(), "packed: contiguous uint8");
  TORCH_CHECK(exact.scalar_type() == at::kShort && exact.is_contiguous() && exact.dim() == 4 && exact.size(2) == 2 &&
                  exact.size(3) == kTile,
              "exact: contiguous (N/16, P*K/32, 2, 16) fp16 bits (int16)");
  TORCH_CHECK(block == 32 || block == 64, "block: 32 or 64 rows");
  TORCH_CHECK(planes == 1 || planes == 2, "planes: 1 (int4) or 2 (int8)");
  const int64_t Kc = packed.size(1) * 2, Gc = Kc / kGroup;  // the codes' columns: planes x the input's
  TORCH_CHECK(Kc % kGroup == 0 && input.size(1) * planes == Kc && exact.size(1) == Gc, "shapes disagree");
  TORCH_CHECK(rows % block == 0 && rows <= packed.size(0) && rows / kTile <= exact.size(0),
              "rows: whole blocks of the weight");
  if (bf16) return packed_matvec_bf16(input, packed, exact, block, rows, planes);
#ifdef __AVX512F__
  const bool joined = planes == 2 && block == 64;  // int8 codes joined from their planes (one FMA a weight)
#else
  const bool joined = false;
#endif
  // elsewhere two planes are two 4-bit weights over [x, x]
  const at::Tensor x = planes == 2 && !joined ? at::cat({input, input}, 1) : input;
  const int64_t M = x.size(0), K = x.size(1), G = K / kGroup;
  at::Tensor out = at::empty({M, rows}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* cp = packed.data_ptr<uint8_t>();
  const auto* ex = reinterpret_cast<const uint16_t*>(exact.data_ptr<int16_t>());
  float* op = out.data_ptr<float>();
  std::vector<float> xsum(M * G);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      float s = 0.f;
      for (int j = 0; j < kGroup; ++j) s += xp[m * K + g * kGroup + j];
      xsum[m * G + g] = s;
    }
  at::parallel_for(0, rows / block, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const uint8_t* codes = cp + b * block * Kc / 2;
      const Exact e{ex + 2 * b * Gc * block, Gc};
#ifdef __AVX512F__
      if (joined) {
        block_many_rows_64<true>(M, xp, K, codes, e, xsum.data(), op + b * block, rows);
        continue;
      }
      if (M > 1 && block == 64) {  // several rows at once: each code converted once for them
        block_many_rows_64<false>(M, xp, K, codes, e, xsum.data(), op + b * block, rows);
        continue;
      }
#endif
      for (int64_t m = 0; m < M; ++m) {
        const float* xm = xp + m * K;
        const float* xs = xsum.data() + m * G;
        float* o = op + m * rows + b * block;
        if (block == 64) {
#ifdef __AVX512F__
          block_row_64_avx512(xm, K, codes, e, xs, o);
#else
          block_row<64>(xm, K, codes, e, xs, o);
#endif
        } else {
          block_row<32>(xm, K, codes, e, xs, o);
        }
      }
    }
  });
  return out;
}

// bf16 of 16 floats, rounded to nearest even (the weights are finite).
#ifdef __AVX512F__
inline __m256i bf16_16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}

// One 64-row block's weights, transposed: out[kcol * ldo + r] for its K columns, planes summed. A column's 32
// bytes are the block's 64 codes (low nibbles rows 0-31, high rows 32-63), so each column is 4 vectors.
template <bool BF16>
void dequantize_block_64(const uint8_t* codes, Exact e, int64_t K, int64_t planes, void* out, int64_t ldo) {
  const __m512i low_nibble = _mm512_set1_epi32(15);
  for (int64_t g0 = 0; g0 < K / kGroup; ++g0) {
    __m512 scale[2][4], min[2][4];
    for (int64_t p = 0; p < planes; ++p)
      for (int i = 0; i < 4; ++i) scales_mins_16(e.at(p * K / kGroup + g0, 16 * i), scale[p][i], min[p][i]);
    for (int k = 0; k < kGroup; ++k) {
      const int64_t kcol = g0 * kGroup + k;
      __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      for (int64_t p = 0; p < planes; ++p) {
        const uint8_t* column = codes + (p * K + kcol) * 32;
        const __m512i a0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(column)));
        const __m512i a1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(column + 16)));
        const __m512i q[4] = {_mm512_and_si512(a0, low_nibble), _mm512_and_si512(a1, low_nibble),
                              _mm512_srli_epi32(a0, 4), _mm512_srli_epi32(a1, 4)};
        for (int i = 0; i < 4; ++i)
          acc[i] = _mm512_add_ps(acc[i], _mm512_fmadd_ps(_mm512_cvtepi32_ps(q[i]), scale[p][i], min[p][i]));
      }
      for (int i = 0; i < 4; ++i) {
        if constexpr (BF16) {
          auto* o = static_cast<at::BFloat16*>(out) + kcol * ldo + 16 * i;
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), bf16_16(acc[i]));
        } else {
          _mm512_storeu_ps(static_cast<float*>(out) + kcol * ldo + 16 * i, acc[i]);
        }
      }
    }
  }
}
#endif

// The same for any block, one value at a time (AVX2 builds: blocks of 32).
template <typename T>
void dequantize_block(const uint8_t* codes, Exact e, int64_t block, int64_t K, int64_t planes, T* out, int64_t ldo) {
  const int64_t half = block / 2;
  for (int64_t kcol = 0; kcol < K; ++kcol)
    for (int r = 0; r < block; ++r) {
      float value = 0.f;
      for (int64_t p = 0; p < planes; ++p) {
        const int64_t column = p * K + kcol;
        const uint16_t* pair = e.at(column / kGroup, r);
        const int code = (codes[column * half + r % half] >> (r < half ? 0 : 4)) & 15;
        value += static_cast<float>(code) * _cvtsh_ss(pair[0]) + _cvtsh_ss(pair[kTile]);
      }
      out[kcol * ldo + r] = T(value);
    }
}

// The weight rows start..stop of a packed layer, transposed: (K, stop - start) floats, float32 or bf16 (rounded
// once, to nearest even), w = q * scale + min with its planes summed (int8: q = 16 hi + lo). What a long prompt's
// GEMM multiplies by (as x @ w.T, a transposed operand it takes as it is); start and stop are whole blocks.
// Transposed because a block stores codes column by column: each column's codes are then one run of rows.
at::Tensor dequantize_rows(const at::Tensor& packed, const at::Tensor& exact, int64_t block, int64_t planes,
                           int64_t start, int64_t stop, bool bf16) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.dim() == 2,
              "packed: contiguous (N, P*K/2) uint8");
  TORCH_CHECK(exact.scalar_type() == at::kShort && exact.is_contiguous() && exact.dim() == 4 && exact.size(2) == 2 &&
                  exact.size(3) == kTile,
              "exact: contiguous (N/16, P*K/32, 2, 16) fp16 bits (int16)");
  TORCH_CHECK(block == 32 || block == 64, "block: 32 or 64 rows");
  TORCH_CHECK(planes == 1 || planes == 2, "planes: 1 or 2");
  const int64_t width = packed.size(1) * 2, K = width / planes, G = width / kGroup;
  TORCH_CHECK(width % (kGroup * planes) == 0 && exact.size(1) == G, "shapes disagree");
  TORCH_CHECK(0 <= start && start <= stop && start % block == 0 && stop % block == 0 && stop <= packed.size(0) &&
                  stop / kTile <= exact.size(0),
              "start, stop: whole blocks of the weight");
  const int64_t rows = stop - start;
  at::Tensor out = at::empty({K, rows}, packed.options().dtype(bf16 ? at::kBFloat16 : at::kFloat));
  const uint8_t* cp = packed.data_ptr<uint8_t>();
  const auto* ex = reinterpret_cast<const uint16_t*>(exact.data_ptr<int16_t>());
  at::parallel_for(start / block, stop / block, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const uint8_t* codes = cp + b * block * width / 2;
      const Exact e{ex + 2 * b * G * block, G};
      const int64_t first = b * block - start;  // the block's first row in out's columns
#ifdef __AVX512F__
      if (block == 64) {
        if (bf16)
          dequantize_block_64<true>(codes, e, K, planes, out.data_ptr<at::BFloat16>() + first, rows);
        else
          dequantize_block_64<false>(codes, e, K, planes, out.data_ptr<float>() + first, rows);
        continue;
      }
#endif
      if (bf16)
        dequantize_block(codes, e, block, K, planes, out.data_ptr<at::BFloat16>() + first, rows);
      else
        dequantize_block(codes, e, block, K, planes, out.data_ptr<float>() + first, rows);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(lmforge, m) {
  m.def("packed_matvec(Tensor x, Tensor packed, Tensor exact_bits, int block, int rows, int planes, bool bf16) -> Tensor");
  m.def("dequantize_rows(Tensor packed, Tensor exact_bits, int block, int planes, int start, int stop, bool bf16) -> Tensor");
}

TORCH_LIBRARY_IMPL(lmforge, CPU, m) {
  m.impl("packed_matvec", &packed_matvec);
  m.impl("dequantize_rows", &dequantize_rows);
}
