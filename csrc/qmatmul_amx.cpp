// AMX paths of lightning_spec::quantized_linear. From 3-6 rows to 16 (a verification batch; amx_min_rows per scheme)
// the streaming kernels (qmatmul.cpp) are bound by their FMAs, 16 multiply-adds per instruction, and bf16 F.linear on
// AMX beats them; a tile multiply here does 16 channels x M rows x 32 inputs (bf16) or 64 (int8). Below, int8 at 1-4
// rows (a decode step) multiplies int8 tiles of its codes by x in fixed point, where the streaming kernels are bound
// by widening each code to a float.
//
// From amx_min_rows, every product is exact, so the result differs from the float kernels only in fp32 summation
// order:
// - each weight enters as its integer code c - z (|c - z| <= 128: exact in bf16) and the scale multiplies the sums,
//   once per channel (int8) or per group (int4, from the tile of the group's partial sums);
// - x enters as up to three bf16 parts, hi + mid + lo == x exactly (8 + 8 + 8 significand bits; hi and mid cut off,
//   lo the rest), one tile multiply each; a bf16 x has no mid or lo and costs one.
// Tiles (C = W x^T): C0-C1 fp32 [16 channels, M rows], W0-W1 bf16 codes [16 channels, 32 inputs], X0-X2 the parts of
// x as bf16 pairs [16 input pairs, M rows], two inputs of one row per 32-bit element.
// w8a8 multiplies int8 codes into int32 (exact, as its other kernels), reading the packed weight in place: C0-C1 int32,
// W0-W1 [16 channels, 64 inputs], X0 x's codes as quads [16 input quads, M rows]. int8 in fixed point is the same
// with four columns per row, one per digit of x.
#include "qmatmul_amx.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>

#include "cpu_isa.h"

namespace lightning_spec {

#ifdef LS_X86
namespace {

constexpr int64_t kInputs = 32;  // inputs per tile multiply: a 64-byte tile row of bf16
// Tile registers, as macros: the tile intrinsics paste their register numbers into assembly.
#define kC0 0
#define kC1 1
#define kW0 2
#define kW1 3
#define kX0 4
#define kX1 5
#define kX2 6

// GCC's ldtilecfg and tileloadd intrinsics do not tell the compiler that they read the memory they are given (it
// dropped the tile configuration's stores as dead): a compiler barrier before each keeps the stores they read.
#define LS_TILE_LOADD(tile, base, stride) \
  do {                                      \
    asm volatile("" ::: "memory");          \
    _tile_loadd(tile, base, stride);        \
  } while (0)

struct Operands {
  const uint32_t* xt;  // [splits][blocks][16 pairs][M]: x's parts as bf16 pairs (w8a8: [blocks][16 quads][M];
                       // int8 in fixed point: [blocks][16 quads][4 digits x M], and M counts those columns)
  const void* w;
  const float* scales;
  const uint8_t* zeros;
  float* y;
  int64_t M, N, K, group, blocks;
};

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

LS_AMX void configure_tiles(int64_t M) {
  TileConfig config;
  for (int t = kC0; t <= kX2; ++t) {
    config.rows[t] = 16;
    config.colsb[t] = t == kW0 || t == kW1 ? 64 : uint16_t(4 * M);
  }
  asm volatile("" ::: "memory");
  _tile_loadconfig(&config);
}

// x [M, K] into xt's parts (zeros past K); the number of parts x needs (1-3), or 0 if some |x| >= 2^100 or is NaN.
LS_AMX int split_x(const float* x, int64_t M, int64_t K, int64_t blocks, uint32_t* xt) {
  alignas(64) static constexpr uint16_t kUpperHalves[32] = {1,  3,  5,  7,  9,  11, 13, 15, 17, 19, 21,
                                                            23, 25, 27, 29, 31, 33, 35, 37, 39, 41, 43,
                                                            45, 47, 49, 51, 53, 55, 57, 59, 61, 63};
  const __m512i upper_halves = _mm512_load_si512(kUpperHalves);  // of 32 floats: their 16 pairs as bf16
  const __m512i cut = _mm512_set1_epi32(int(0xFFFF0000u));
  const __m512 limit = _mm512_set1_ps(0x1p100f);
  const __m512i pair_rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                               _mm512_set1_epi32(int(M)));
  const int64_t plane = blocks * 16 * M;
  __mmask16 out_of_range = 0, has_mid = 0, has_lo = 0;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t k = b * kInputs, live = std::min(kInputs, K - k);
      const __mmask16 first = live >= 16 ? 0xFFFF : (1u << live) - 1;
      const __mmask16 second = live >= 32 ? 0xFFFF : live > 16 ? (1u << (live - 16)) - 1 : 0;
      __m512 v[2] = {_mm512_maskz_loadu_ps(first, x + m * K + k), _mm512_maskz_loadu_ps(second, x + m * K + k + 16)};
      __m512 rest[2], lo[2];
      for (int h = 0; h < 2; ++h) {
        out_of_range |= _mm512_cmp_ps_mask(_mm512_abs_ps(v[h]), limit, _CMP_NLT_UQ);
        rest[h] = _mm512_sub_ps(v[h], _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v[h]), cut)));
        lo[h] = _mm512_sub_ps(rest[h], _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(rest[h]), cut)));
        has_mid |= _mm512_cmp_ps_mask(rest[h], _mm512_setzero_ps(), _CMP_NEQ_UQ);
        has_lo |= _mm512_cmp_ps_mask(lo[h], _mm512_setzero_ps(), _CMP_NEQ_UQ);
      }
      uint32_t* at = xt + b * 16 * M + m;
      const __m512 parts[3][2] = {{v[0], v[1]}, {rest[0], rest[1]}, {lo[0], lo[1]}};
      for (int s = 0; s < 3; ++s)
        _mm512_i32scatter_epi32(at + s * plane, pair_rows,
                                _mm512_permutex2var_epi16(_mm512_castps_si512(parts[s][0]), upper_halves,
                                                          _mm512_castps_si512(parts[s][1])),
                                4);
    }
  if (out_of_range) return 0;
  return has_lo ? 3 : has_mid ? 2 : 1;
}

// C += W x^T for one block of 32 inputs, over x's parts: C0 += W0 x^T (kTiles 1, or kTiles 2 and C1 += W1 x^T
// too), or C1 += W0 x^T (kTiles 1, kIntoC1).
template <int kSplits, int kTiles, bool kIntoC1 = false>
LS_AMX inline void multiply_block(const Operands& o, int64_t b) {
  const uint32_t* xb = o.xt + b * 16 * o.M;
  const int64_t stride = 4 * o.M, plane = o.blocks * 16 * o.M;
#define LS_MULTIPLY(X)                                        \
  if constexpr (kIntoC1) {                                    \
    _tile_dpbf16ps(kC1, kW0, X);                              \
  } else {                                                    \
    _tile_dpbf16ps(kC0, kW0, X);                              \
    if constexpr (kTiles == 2) _tile_dpbf16ps(kC1, kW1, X);   \
  }
  LS_TILE_LOADD(kX0, xb, stride);
  LS_MULTIPLY(kX0)
  if constexpr (kSplits > 1) {
    LS_TILE_LOADD(kX1, xb + plane, stride);
    LS_MULTIPLY(kX1)
  }
  if constexpr (kSplits > 2) {
    LS_TILE_LOADD(kX2, xb + 2 * plane, stride);
    LS_MULTIPLY(kX2)
  }
#undef LS_MULTIPLY
}

// Channels n..n+15 (zero rows past N), inputs 32b..32b+31 (zeros past K) of an int8 weight, as bf16 codes.
LS_AMX void widen_int8(const Operands& o, int64_t n, int64_t b, uint16_t* tile) {
  const int64_t k = b * kInputs, live = std::min(kInputs, o.K - k);
  alignas(16) int8_t tail[32] = {};
  for (int i = 0; i < 16; ++i) {
    __m512i row = _mm512_setzero_si512();
    if (n + i < o.N) {
      const int8_t* w = static_cast<const int8_t*>(o.w) + (n + i) * o.K + k;
      if (live < kInputs) w = static_cast<const int8_t*>(std::memcpy(tail, w, live));
      const __m512 first = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))));
      const __m512 second = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 16))));
      row = (__m512i)_mm512_cvtne2ps_pbh(second, first);
    }
    _mm512_store_si512(tile + 32 * i, row);
  }
}

// bf16 of c - z for the codes c = 0..15, one table per zero point z = 0..15, repeated in entries 16-31 (vpermw reads
// an index's low 5 bits: a whole byte's, below, reads its low nibble's entry).
struct CodeTables {
  alignas(64) uint16_t values[16][32] = {};
  CodeTables() {
    for (int z = 0; z < 16; ++z)
      for (int c = 0; c < 32; ++c) {
        const float v = float(c % 16 - z);
        uint32_t bits;
        std::memcpy(&bits, &v, sizeof bits);
        values[z][c] = uint16_t(bits >> 16);
      }
  }
};
const CodeTables kCodeTables;

// Channels n..n+15 (zero rows past N), inputs 32b..32b+31 of an int4 weight in group g, as bf16 codes c - z: the
// packed 16 bytes' low nibbles are the first 16 inputs, the high nibbles the next 16. Byte j goes to words j and
// 16 + j (vpermb), the upper 16 words shift down to their high nibble, and the table maps each word to its value.
template <bool kAsym>
LS_AMX void widen_int4(const Operands& o, int64_t n, int64_t b, int64_t g, uint16_t* tile) {
  const int64_t groups = o.K / o.group;
  alignas(64) static constexpr uint8_t kSpread[64] = {0, 0, 1, 0, 2, 0, 3, 0, 4, 0, 5, 0, 6, 0, 7, 0, 8, 0, 9, 0, 10, 0,
                                                     11, 0, 12, 0, 13, 0, 14, 0, 15, 0, 0, 0, 1, 0, 2, 0, 3, 0, 4, 0, 5,
                                                     0, 6, 0, 7, 0, 8, 0, 9, 0, 10, 0, 11, 0, 12, 0, 13, 0, 14, 0, 15, 0};
  const __m512i spread = _mm512_load_si512(kSpread);
  const __m512i shift = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
  for (int i = 0; i < 16; ++i) {
    __m512i row = _mm512_setzero_si512();
    if (n + i < o.N) {
      const uint8_t* w = static_cast<const uint8_t*>(o.w) + (n + i) * (o.K / 2) + 16 * b;
      const __m512i bytes = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
      const __m512i codes = _mm512_srlv_epi16(_mm512_maskz_permutexvar_epi8(0x5555555555555555ull, spread, bytes), shift);
      const int z = kAsym ? o.zeros[(n + i) * groups + g] : 8;
      row = _mm512_permutexvar_epi16(codes, _mm512_load_si512(kCodeTables.values[z]));
    }
    _mm512_store_si512(tile + 32 * i, row);
  }
}

// The weight tiles are widened this many blocks ahead of their multiply, into kAhead + 1 buffers in turn, so that the
// widening overlaps the tile multiplies (1, 2 and 4 measured within noise of each other on the AMX Xeon; 2 was ahead
// on the large layers).
constexpr int kAhead = 2;

// int8: 32 channels at a time, their sums over all of K in C0-C1, then one scale per channel.
template <int kSplits>
LS_AMX void int8_channels(const Operands& o, int64_t n0, int64_t n1) {
  alignas(64) uint16_t codes[kAhead + 1][2][16 * 32];
  alignas(64) float sums[2][16 * 16];
  auto widen = [&](int64_t n, int64_t b) {
    widen_int8(o, n, b, codes[b % (kAhead + 1)][0]);
    widen_int8(o, n + 16, b, codes[b % (kAhead + 1)][1]);
  };
  for (int64_t n = n0; n < n1; n += 32) {
    for (int64_t b = 0; b < std::min<int64_t>(kAhead, o.blocks); ++b) widen(n, b);
    _tile_zero(kC0);
    _tile_zero(kC1);
    for (int64_t b = 0; b < o.blocks; ++b) {
      LS_TILE_LOADD(kW0, codes[b % (kAhead + 1)][0], 64);
      LS_TILE_LOADD(kW1, codes[b % (kAhead + 1)][1], 64);
      multiply_block<kSplits, 2>(o, b);
      if (b + kAhead < o.blocks) widen(n, b + kAhead);
    }
    _tile_stored(kC0, sums[0], 64);
    _tile_stored(kC1, sums[1], 64);
    for (int64_t i = 0; i < 32 && n + i < o.N; ++i)
      for (int64_t m = 0; m < o.M; ++m) o.y[m * o.N + n + i] = sums[i / 16][i % 16 * 16 + m] * o.scales[n + i];
  }
}

LS_AMX inline void add_group(__m512 (&acc)[16], const float* sums, const float* const (&scale)[16], int64_t g) {
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_fmadd_ps(_mm512_load_ps(sums + 16 * i), _mm512_set1_ps(scale[i][g]), acc[i]);
}

// int4: 16 channels at a time. Groups take turns in C0 and C1, so that a group's multiplies need not wait for the
// store of the one before, and a stored group is read a group later, once its store has landed; its sums, times its
// scales, go into 16 accumulators (one per channel, lane m for row m).
template <int kSplits, bool kAsym>
LS_AMX void int4_channels(const Operands& o, int64_t n0, int64_t n1) {
  alignas(64) uint16_t codes[kAhead + 1][16 * 32];
  alignas(64) float sums[2][16 * 16] = {};  // lanes past M: never written by the tile store, never read out
  const int64_t groups = o.K / o.group, chunks = o.group / kInputs;
  for (int64_t n = n0; n < n1; n += 16) {
    const float* scale[16];  // rows past N read the last channel's scales (their sums are 0)
    for (int i = 0; i < 16; ++i) scale[i] = o.scales + std::min(n + i, o.N - 1) * groups;
    __m512 acc[16];
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t b = 0; b < std::min<int64_t>(kAhead, o.blocks); ++b)
      widen_int4<kAsym>(o, n, b, b / chunks, codes[b % (kAhead + 1)]);
    for (int64_t g = 0; g < groups; ++g) {
      const bool odd = g % 2;
      if (odd) _tile_zero(kC1); else _tile_zero(kC0);
      for (int64_t b = g * chunks; b < (g + 1) * chunks; ++b) {
        LS_TILE_LOADD(kW0, codes[b % (kAhead + 1)], 64);
        if (odd) multiply_block<kSplits, 1, true>(o, b); else multiply_block<kSplits, 1>(o, b);
        if (b + kAhead < o.blocks)
          widen_int4<kAsym>(o, n, b + kAhead, (b + kAhead) / chunks, codes[(b + kAhead) % (kAhead + 1)]);
      }
      if (g > 0) {  // the group before, from the other tile; the one before it, from memory
        if (odd) _tile_stored(kC0, sums[0], 64); else _tile_stored(kC1, sums[1], 64);
        if (g > 1) add_group(acc, sums[odd], scale, g - 2);
      }
    }
    if (groups % 2) _tile_stored(kC0, sums[0], 64); else _tile_stored(kC1, sums[1], 64);
    if (groups > 1) add_group(acc, sums[groups % 2], scale, groups - 2);
    add_group(acc, sums[(groups - 1) % 2], scale, groups - 1);
    alignas(64) float out[16 * 16];
    for (int i = 0; i < 16; ++i) _mm512_store_ps(out + 16 * i, acc[i]);
    for (int64_t i = 0; i < 16 && n + i < o.N; ++i)
      for (int64_t m = 0; m < o.M; ++m) o.y[m * o.N + n + i] = out[16 * i + m];
  }
}

template <int kSplits>
void run_channels(const Operands& o, Scheme scheme, int64_t n0, int64_t n1) {
  switch (scheme) {
    case Scheme::kInt8: return int8_channels<kSplits>(o, n0, n1);
    case Scheme::kInt4: return int4_channels<kSplits, false>(o, n0, n1);
    default: return int4_channels<kSplits, true>(o, n0, n1);
  }
}

// ---------------------------------------------------------------- w8a8

constexpr int64_t kInputs8 = 64;  // int8 inputs per tile multiply

// x's codes [M, K] as int8 quads: xt[(b * 16 + r) * M + m] holds row m's codes 64b + 4r .. 64b + 4r + 3 (zeros
// past K).
void pack_codes(const int8_t* codes, int64_t M, int64_t K, int64_t blocks, uint32_t* xt) {
  std::memset(xt, 0, blocks * 16 * M * sizeof(uint32_t));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; k += 4)
      std::memcpy(xt + (k / 4) * M + m, codes + m * K + k, std::min<int64_t>(4, K - k));
}

// 32 channels at a time, their int32 sums over all of K in C0-C1, one per channel and column of xt; store(n, sums)
// writes the outputs of channels n..n+15 (those below N) from their sums [16 channels, 16 columns]. The weight rows
// are tile operands as they lie (a row's last block reads into the next row, against x's zero padding), unless that
// would read past the weight's end: then the step's rows are copied zero-padded first.
template <typename Store>
LS_AMX void int8_code_channels(const Operands& o, int64_t n0, int64_t n1, const Store& store) {
  alignas(64) int8_t edge[32 * kInputs8];
  alignas(64) int32_t sums[2][16 * 16];
  const int8_t* w = static_cast<const int8_t*>(o.w);
  const int64_t stride = 4 * o.M;
  for (int64_t n = n0; n < n1; n += 32) {
    const bool in_place = (n + 31) * o.K + o.blocks * kInputs8 <= o.N * o.K;
    _tile_zero(kC0);
    _tile_zero(kC1);
    for (int64_t b = 0; b < o.blocks; ++b) {
      const int8_t* rows = w + n * o.K + b * kInputs8;
      int64_t row_stride = o.K;
      if (!in_place) {
        std::memset(edge, 0, sizeof edge);
        const int64_t live = std::min(kInputs8, o.K - b * kInputs8);
        for (int64_t i = 0; i < 32 && n + i < o.N; ++i) std::memcpy(edge + i * kInputs8, rows + i * o.K, live);
        rows = edge;
        row_stride = kInputs8;
      }
      LS_TILE_LOADD(kW0, rows, row_stride);
      LS_TILE_LOADD(kW1, rows + 16 * row_stride, row_stride);
      LS_TILE_LOADD(kX0, o.xt + b * 16 * o.M, stride);
      _tile_dpbssd(kC0, kW0, kX0);
      _tile_dpbssd(kC1, kW1, kX0);
    }
    _tile_stored(kC0, sums[0], 64);
    _tile_stored(kC1, sums[1], 64);
    store(n, sums[0]);
    if (n + 16 < o.N) store(n + 16, sums[1]);
  }
}

// ---------------------------------------------------------------- int8 at 1-4 rows: x in fixed point

// Row m's inputs as integers v = round(x * 2^shift[m]), |v| < 2^30, written in four balanced base-256 digits
// (v = d0 2^24 + d1 2^16 + d2 2^8 + d3, each in [-128, 127]) into xt's columns 4m..4m+3 as int8 quads (zeros past K).
// shift puts the row's largest |x| just under 2^30. False, having written part of xt, if x holds an inf or a NaN.
LS_AMX bool to_digits(const float* x, int64_t M, int64_t K, int64_t blocks, uint32_t* xt, int* shift) {
  const int64_t columns = 4 * M;
  std::memset(xt, 0, blocks * 16 * columns * sizeof(uint32_t));
  const __m512 inf = _mm512_set1_ps(INFINITY);
  const __m512i half = _mm512_set1_epi32(128), byte = _mm512_set1_epi32(255);
  for (int64_t m = 0; m < M; ++m) {
    const float* row = x + m * K;
    __m512 largest = _mm512_setzero_ps();
    __mmask16 non_finite = 0;
    for (int64_t k = 0; k < K; k += 16) {
      const __m512 v = _mm512_abs_ps(_mm512_maskz_loadu_ps(K - k >= 16 ? 0xFFFF : (1u << (K - k)) - 1, row + k));
      non_finite |= _mm512_cmp_ps_mask(v, inf, _CMP_NLT_UQ);
      largest = _mm512_max_ps(largest, v);
    }
    if (non_finite) return false;
    int exponent;  // the largest |x| < 2^exponent
    std::frexp(_mm512_reduce_max_ps(largest), &exponent);
    shift[m] = 30 - exponent;
    const __m512 scale = _mm512_set1_ps(float(shift[m]));
    for (int64_t k = 0; k < K; k += 16) {
      const __m512 v = _mm512_maskz_loadu_ps(K - k >= 16 ? 0xFFFF : (1u << (K - k)) - 1, row + k);
      __m512i rest = _mm512_cvtps_epi32(_mm512_scalef_ps(v, scale));  // x 2^shift without forming 2^shift; rounded to even
      __m128i digit[4];
      for (int d = 3; d >= 0; --d) {
        const __m512i low = _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(rest, half), byte), half);
        digit[d] = _mm512_cvtepi32_epi8(low);
        rest = _mm512_srai_epi32(_mm512_sub_epi32(rest, low), 8);
      }
      // digit[d] holds the quads of inputs k..k+15; each quad's four digits go to its xt row, columns 4m..4m+3
      const __m128i t0 = _mm_unpacklo_epi32(digit[0], digit[1]), t1 = _mm_unpacklo_epi32(digit[2], digit[3]);
      const __m128i t2 = _mm_unpackhi_epi32(digit[0], digit[1]), t3 = _mm_unpackhi_epi32(digit[2], digit[3]);
      const __m128i quads[4] = {_mm_unpacklo_epi64(t0, t1), _mm_unpackhi_epi64(t0, t1), _mm_unpacklo_epi64(t2, t3),
                                _mm_unpackhi_epi64(t2, t3)};
      for (int q = 0; q < 4; ++q)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(xt + (k / 4 + q) * columns + 4 * m), quads[q]);
    }
  }
  return true;
}

LS_AMX void release_tiles() { _tile_release(); }

// Splits N over threads, each with its own tile configuration (thread state, x and C tiles of `columns`), in steps of
// `channels`.
template <typename Run>
void parallel_channels(int64_t M, int64_t columns, int64_t N, int64_t K, int64_t channels, const Run& run) {
  // A thread per ~256K multiply-adds at least: below that, waking a second thread costs more than it saves.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / (channels * K * M));
  at::parallel_for(0, (N + channels - 1) / channels, grain, [&](int64_t t0, int64_t t1) {
    configure_tiles(columns);
    run(t0 * channels, std::min(N, t1 * channels));
    release_tiles();
  });
}

}  // namespace

bool amx_quantized_linear(const float* x, const void* packed, const float* scales, const uint8_t* zeros, Scheme scheme,
                          int64_t group, float* y, int64_t M, int64_t N, int64_t K) {
  TORCH_INTERNAL_ASSERT(M >= 1 && M <= kAmxMaxRows && scheme != Scheme::kW8A8);
  const int64_t blocks = (K + kInputs - 1) / kInputs;
  std::unique_ptr<uint32_t[]> xt(new uint32_t[3 * blocks * 16 * M]);
  const int splits = split_x(x, M, K, blocks, xt.get());
  if (!splits) return false;
  const Operands o{xt.get(), packed, scales, zeros, y, M, N, K, group, blocks};
  parallel_channels(M, M, N, K, scheme == Scheme::kInt8 ? 32 : 16, [&](int64_t n0, int64_t n1) {
    switch (splits) {
      case 1: return run_channels<1>(o, scheme, n0, n1);
      case 2: return run_channels<2>(o, scheme, n0, n1);
      default: return run_channels<3>(o, scheme, n0, n1);
    }
  });
  return true;
}

void amx_w8a8_linear(const int8_t* codes, const float* x_scales, const int8_t* packed, const float* scales, float* y,
                     int64_t M, int64_t N, int64_t K) {
  TORCH_INTERNAL_ASSERT(M >= 1 && M <= kAmxMaxRows);
  const int64_t blocks = (K + kInputs8 - 1) / kInputs8;
  std::unique_ptr<uint32_t[]> xt(new uint32_t[blocks * 16 * M]);
  pack_codes(codes, M, K, blocks, xt.get());
  const Operands o{xt.get(), packed, scales, nullptr, y, M, N, K, 0, blocks};
  parallel_channels(M, M, N, K, 32, [&](int64_t n0, int64_t n1) {
    int8_code_channels(o, n0, n1, [&](int64_t n, const int32_t* sums) {
      for (int64_t i = 0; i < 16 && n + i < N; ++i)
        for (int64_t m = 0; m < M; ++m) y[m * N + n + i] = float(sums[16 * i + m]) * x_scales[m] * scales[n + i];
    });
  });
}

// Channels n..n+15 (those below N) of y from their digits' sums [16 channels, 4 digits x M]: each row's digits
// recombine in double (exactly while below 2^53), times the row's unit and the channel's scale.
LS_AMX void store_fixed_point(const int32_t* sums, const float* scales, const double* unit, float* y, int64_t M,
                              int64_t N, int64_t n) {
  const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32(16));
  const __mmask16 live = N - n >= 16 ? 0xFFFF : (1u << (N - n)) - 1;
  const __m512 scale = _mm512_maskz_loadu_ps(live, scales + n);
  const __m512d radix = _mm512_set1_pd(256.0);
  for (int64_t m = 0; m < M; ++m) {
    __m512i digit[4];
    for (int d = 0; d < 4; ++d) digit[d] = _mm512_i32gather_epi32(_mm512_add_epi32(rows, _mm512_set1_epi32(int(4 * m + d))), sums, 4);
    __m256 half[2];
    for (int h = 0; h < 2; ++h) {
      __m512d part[4];
      for (int d = 0; d < 4; ++d)
        part[d] = _mm512_cvtepi32_pd(h ? _mm512_extracti64x4_epi64(digit[d], 1) : _mm512_castsi512_si256(digit[d]));
      const __m512d total = _mm512_fmadd_pd(_mm512_fmadd_pd(_mm512_fmadd_pd(part[0], radix, part[1]), radix, part[2]), radix, part[3]);
      const __m256 channel_scale = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(scale), h));
      half[h] = _mm512_cvtpd_ps(_mm512_mul_pd(_mm512_mul_pd(total, _mm512_set1_pd(unit[m])), _mm512_cvtps_pd(channel_scale)));
    }
    _mm512_mask_storeu_ps(y + m * N + n, live,
                          _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(half[0])), _mm256_castps_pd(half[1]), 1)));
  }
}

bool amx_int8_fixed_point_linear(const float* x, const int8_t* packed, const float* scales, float* y, int64_t M,
                                 int64_t N, int64_t K) {
  TORCH_INTERNAL_ASSERT(M >= 1 && M <= kAmxFixedPointRows && K < kAmxFixedPointMaxK);
  const int64_t blocks = (K + kInputs8 - 1) / kInputs8, columns = 4 * M;
  std::unique_ptr<uint32_t[]> xt(new uint32_t[blocks * 16 * columns]);
  int shift[kAmxFixedPointRows];
  if (!to_digits(x, M, K, blocks, xt.get(), shift)) return false;
  double unit[kAmxFixedPointRows];
  for (int64_t m = 0; m < M; ++m) unit[m] = std::ldexp(1.0, -shift[m]);
  const Operands o{xt.get(), packed, scales, nullptr, y, columns, N, K, 0, blocks};
  parallel_channels(M, columns, N, K, 32, [&](int64_t n0, int64_t n1) {
    int8_code_channels(o, n0, n1, [&](int64_t n, const int32_t* sums) { store_fixed_point(sums, scales, unit, y, M, N, n); });
  });
  return true;
}

#else
bool amx_quantized_linear(const float*, const void*, const float*, const uint8_t*, Scheme, int64_t, float*, int64_t,
                          int64_t, int64_t) {
  return false;
}
void amx_w8a8_linear(const int8_t*, const float*, const int8_t*, const float*, float*, int64_t, int64_t, int64_t) {
  TORCH_INTERNAL_ASSERT(false, "no AMX on this CPU");
}
bool amx_int8_fixed_point_linear(const float*, const int8_t*, const float*, float*, int64_t, int64_t, int64_t) {
  return false;
}
#endif

}  // namespace lightning_spec
