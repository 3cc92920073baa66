// CPU kernels of lightning_spec::quantized_linear: y = x @ dequant(W)^T (+ bias).
//
// Small M (decode and verification batches, M <= kStreamRows): the weight is streamed once; each tile of NR
// output channels x MR rows keeps NR*MR accumulators, and each weight chunk is widened once for all MR rows.
// at::parallel_for splits the output channels. Large M is compute-bound: dequantize once and let ATen's GEMM run.
// Paths, chosen at run time (cpu_isa.h): AMX (qmatmul_amx.cpp: int8 at 1-16 rows, int4 at 6-16, w8a8 at 3-16),
// AVX-512 (VNNI for w8a8's int16 dot, and for int4 at M <= 2 with x in fixed point), AVX2+FMA, plain C++.
#include "qmatmul.h"

#include <ATen/Parallel.h>

#include "cpu_isa.h"
#include "qmatmul_amx.h"
#include "qmatmul_checks.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

namespace lightning_spec {
namespace {

constexpr int64_t kStreamRows = 16;
// int4 on VNNI up to this many rows: beyond, one table decode per chunk serves enough rows' FMAs to be cheaper.
constexpr int kFixedPointRows = 2;

// int4 on VNNI (below): one row's 128 inputs (four 32-input chunks) in 22-bit fixed point, laid out like the
// packed weight's 64 bytes for those inputs.
struct FixedPointBlock {
  int8_t lo[3][64];  // limbs of the inputs under the low nibbles: byte 16q + j holds chunk q's input j
  int8_t hi[3][64];  // ... under the high nibbles: chunk q's input 16 + j
  int32_t sum[16];   // per int32 lane (the 8 inputs its 4 bytes hold in lo and hi): the sum of their integers
  float unit[16];    // per lane: the fixed-point unit of its chunk
};

struct Problem {
  const float* x;      // [M, K] fp32
  const int16_t* xq;   // w8a8: [M, K] activation codes
  const float* xs;     // w8a8: [M] activation scales
  const FixedPointBlock* xfixed;  // int4 on VNNI: [M, ceil(K / 128)] blocks of x
  const void* w;       // packed
  const float* scales;
  const uint8_t* zeros;
  float* y;            // [M, N]
  int64_t M, N, K, group;
};

// ---------------------------------------------------------------- plain C++

void generic_rows(const Problem& p, Scheme scheme, int64_t n0, int64_t n1) {
  std::vector<float> wrow(p.K);
  for (int64_t n = n0; n < n1; ++n) {
    if (scheme == Scheme::kW8A8) {
      const int8_t* w = static_cast<const int8_t*>(p.w) + n * p.K;
      for (int64_t m = 0; m < p.M; ++m) {
        int32_t acc = 0;
        for (int64_t k = 0; k < p.K; ++k) acc += int32_t(p.xq[m * p.K + k]) * int32_t(w[k]);
        p.y[m * p.N + n] = float(acc) * p.xs[m] * p.scales[n];
      }
      continue;
    }
    if (scheme == Scheme::kInt8) {
      const int8_t* w = static_cast<const int8_t*>(p.w) + n * p.K;
      for (int64_t k = 0; k < p.K; ++k) wrow[k] = float(w[k]) * p.scales[n];
    } else {
      const uint8_t* w = static_cast<const uint8_t*>(p.w) + n * (p.K / 2);
      const int64_t groups = p.K / p.group;
      for (int64_t k = 0; k < p.K; ++k) {
        const uint8_t byte = w[(k / 32) * 16 + (k % 16)];
        const int q = (k % 32) < 16 ? (byte & 0x0F) : (byte >> 4);
        const int64_t g = k / p.group;
        const int z = scheme == Scheme::kInt4 ? 8 : p.zeros[n * groups + g];
        wrow[k] = float(q - z) * p.scales[n * groups + g];
      }
    }
    for (int64_t m = 0; m < p.M; ++m) {
      float acc = 0.f;
      for (int64_t k = 0; k < p.K; ++k) acc += p.x[m * p.K + k] * wrow[k];
      p.y[m * p.N + n] = acc;
    }
  }
}

#ifdef LS_X86
// ---------------------------------------------------------------- AVX-512

LS_AVX512 inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

// [hsum(a), hsum(b), hsum(c), hsum(d)], each added in hsum's order (bit for bit), in about half the instructions of
// four hsums: a tile of 576 inputs spent a third of its time after its last block.
LS_AVX512 inline __m128 hsum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  // lanes j and j + 8, in 128-bit blocks [a0+a2, a1+a3, b0+b2, b1+b3] and the same of c, d
  const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
  // then j + 4: one 128-bit block per vector, [a, b, c, d]; then j + 2 and j + 1 within each block
  const __m512 q = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
  const __m512 h = _mm512_add_ps(q, _mm512_permute_ps(q, 0x4E));
  const __m512 sums = _mm512_add_ps(h, _mm512_permute_ps(h, 0xB1));
  return _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), sums));
}

// y[r * ldy + i] = hsum(acc[i][r]): channels four at a time.
template <int NR, int MR>
LS_AVX512 inline void store_sums(const __m512 (&acc)[NR][MR], float* y, int64_t ldy) {
  for (int r = 0; r < MR; ++r) {
    int i = 0;
    for (; i + 4 <= NR; i += 4)
      _mm_storeu_ps(y + r * ldy + i, hsum4(acc[i][r], acc[i + 1][r], acc[i + 2][r], acc[i + 3][r]));
    for (; i < NR; ++i) y[r * ldy + i] = hsum(acc[i][r]);
  }
}

// int8 weight-only: tiles of NR channels x MR rows.
template <int NR, int MR>
LS_AVX512 void int8_tile(const Problem& p, int64_t n, int64_t m) {
  const int8_t* w = static_cast<const int8_t*>(p.w);
  __m512 acc[NR][MR];
  for (int i = 0; i < NR; ++i)
    for (int r = 0; r < MR; ++r) acc[i][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= p.K; k += 16) {
    __m512 xv[MR];
    for (int r = 0; r < MR; ++r) xv[r] = _mm512_loadu_ps(p.x + (m + r) * p.K + k);
    for (int i = 0; i < NR; ++i) {
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + (n + i) * p.K + k));
      const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw));
      for (int r = 0; r < MR; ++r) acc[i][r] = _mm512_fmadd_ps(xv[r], wv, acc[i][r]);
    }
  }
  const auto tail = [&](int i, int r) {
    float sum = 0.f;
    for (int64_t t = k; t < p.K; ++t) sum += p.x[(m + r) * p.K + t] * float(w[(n + i) * p.K + t]);
    return sum;
  };
  for (int r = 0; r < MR; ++r) {
    float* y = p.y + (m + r) * p.N + n;
    int i = 0;
    for (; i + 4 <= NR; i += 4) {  // (hsum + tail) * scale, four channels at a time
      const __m128 sums = hsum4(acc[i][r], acc[i + 1][r], acc[i + 2][r], acc[i + 3][r]);
      const __m128 tails = _mm_setr_ps(tail(i, r), tail(i + 1, r), tail(i + 2, r), tail(i + 3, r));
      _mm_storeu_ps(y + i, _mm_mul_ps(_mm_add_ps(sums, tails), _mm_loadu_ps(p.scales + n + i)));
    }
    for (; i < NR; ++i) y[i] = (hsum(acc[i][r]) + tail(i, r)) * p.scales[n + i];
  }
}

// int4 (symmetric or with zero points), K a multiple of the group size (32, 64 or 128). Each nibble becomes its
// dequantized weight by a 16-entry table lookup: the table holds (c - z) * s for the codes c = 0..15 (exactly
// dequantize_weight's values), and vpermps reads only an index's low 4 bits, so a 32-weight chunk is widened once
// (byte j to lane j), its high nibbles need one shift, and no masks, conversions or zero-point corrections remain.
// The table costs one multiply per channel and group.
// kChunks: 32-weight chunks per group when fixed at compile time (1: group 32, whose loop then unrolls), else 0.
template <int NR, int MR, bool kAsym, int kChunks>
LS_AVX512 void int4_tile(const Problem& p, int64_t n, int64_t m) {
  const int64_t groups = p.K / p.group, chunks = kChunks ? kChunks : p.group / 32;
  const __m512 codes = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const uint8_t* w[NR];
  const float* x[MR];
  __m512 acc[NR][MR];
  for (int i = 0; i < NR; ++i) w[i] = static_cast<const uint8_t*>(p.w) + (n + i) * (p.K / 2);
  for (int r = 0; r < MR; ++r) x[r] = p.x + (m + r) * p.K;
  for (int i = 0; i < NR; ++i)
    for (int r = 0; r < MR; ++r) acc[i][r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 table[NR];
    for (int i = 0; i < NR; ++i) {
      const int64_t at = (n + i) * groups + g;
      const __m512 q = _mm512_sub_ps(codes, _mm512_set1_ps(kAsym ? float(p.zeros[at]) : 8.f));
      table[i] = _mm512_mul_ps(q, _mm512_set1_ps(p.scales[at]));
    }
    for (int64_t c = 0; c < chunks; ++c) {
      __m512 xlo[MR], xhi[MR];
      for (int r = 0; r < MR; ++r) {
        xlo[r] = _mm512_loadu_ps(x[r]);
        xhi[r] = _mm512_loadu_ps(x[r] + 16);
        x[r] += 32;
      }
      for (int i = 0; i < NR; ++i) {
        const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w[i])));
        w[i] += 16;
        const __m512 wlo = _mm512_permutexvar_ps(bytes, table[i]);
        const __m512 whi = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table[i]);
        for (int r = 0; r < MR; ++r) acc[i][r] = _mm512_fmadd_ps(xhi[r], whi, _mm512_fmadd_ps(xlo[r], wlo, acc[i][r]));
      }
    }
  }
  store_sums(acc, p.y + m * p.N + n, p.N);
}

// int4 on VNNI: x in 22-bit block fixed point, so that vpdpbusd multiplies 64 weight nibbles (u8) by 64 limbs of x
// (s8) per instruction, exactly, into int32 lane sums, where the table path above spends a lookup and an FMA per 16
// weights. Each 32-input chunk of a row gets a power-of-two unit 2^(e - 22), |x| < 2^e over the chunk, so every input
// becomes an integer of at most 22 bits, three balanced int8 limbs (l0 + 256 l1 + 65536 l2). An input is off by at
// most half a unit, 2^(e - 23), under 2^-22 of its chunk's largest |x|: about float32's own rounding of the chunk's
// dot product. The lane sums (|.| < 2^29) stay exact until they turn float, times the chunk's unit and the group's
// scale. Rows with an inf or NaN take the table path.

LS_AVX512 inline void store_limbs(__m512i v, int8_t (*limbs)[64], int q) {
  for (int i = 0; i < 3; ++i) {
    const __m512i limb = _mm512_sub_epi32(
        _mm512_and_si512(_mm512_add_epi32(v, _mm512_set1_epi32(128)), _mm512_set1_epi32(255)), _mm512_set1_epi32(128));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(limbs[i] + 16 * q), _mm512_cvtepi32_epi8(limb));
    v = _mm512_srai_epi32(_mm512_sub_epi32(v, limb), 8);
  }
}

// One row of x [K] as ceil(K / 128) blocks; false if it holds an inf or NaN. A last block of two chunks repeats
// them in its upper half, for the tiles that read two channels' last 32 bytes at once; of one or three, it is
// zero-padded.
LS_AVX512 bool to_fixed_point(const float* x, int64_t K, FixedPointBlock* blocks) {
  const int64_t chunks = K / 32;
  if (chunks % 4) std::memset(&blocks[chunks / 4], 0, sizeof(FixedPointBlock));
  for (int64_t c = 0; c < chunks; ++c) {
    const __m512 a = _mm512_loadu_ps(x + 32 * c), b = _mm512_loadu_ps(x + 32 * c + 16);
    if (_mm512_cmp_ps_mask(_mm512_sub_ps(a, a), _mm512_sub_ps(b, b), _CMP_UNORD_Q)) return false;
    int e;
    std::frexp(_mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b))), &e);
    const __m512 to_units = _mm512_set1_ps(float(22 - e));  // scalef: exact, with no 2^(22 - e) to overflow
    const __m512i ma = _mm512_cvtps_epi32(_mm512_scalef_ps(a, to_units));
    const __m512i mb = _mm512_cvtps_epi32(_mm512_scalef_ps(b, to_units));
    FixedPointBlock& block = blocks[c / 4];
    const int q = int(c % 4);
    store_limbs(ma, block.lo, q);
    store_limbs(mb, block.hi, q);
    alignas(64) int32_t both[16];
    _mm512_store_si512(both, _mm512_add_epi32(ma, mb));
    for (int l = 0; l < 4; ++l) {
      block.sum[4 * q + l] = both[4 * l] + both[4 * l + 1] + both[4 * l + 2] + both[4 * l + 3];
      block.unit[4 * q + l] = std::ldexp(1.f, e - 22);
    }
  }
  if (chunks % 4 == 2) {
    FixedPointBlock& last = blocks[chunks / 4];
    for (int i = 0; i < 3; ++i) {
      std::memcpy(last.lo[i] + 32, last.lo[i], 32);
      std::memcpy(last.hi[i] + 32, last.hi[i], 32);
    }
    std::memcpy(last.sum + 8, last.sum, 8 * sizeof(int32_t));
    std::memcpy(last.unit + 8, last.unit, 8 * sizeof(float));
  }
  return true;
}

struct XBlock {  // one row's block in registers
  __m512i lo[3], hi[3], sum;
  __m512 unit;
};

LS_AVX512 inline XBlock load_block(const FixedPointBlock& b) {
  XBlock x;
  for (int j = 0; j < 3; ++j) {
    x.lo[j] = _mm512_loadu_si512(b.lo[j]);
    x.hi[j] = _mm512_loadu_si512(b.hi[j]);
  }
  x.sum = _mm512_loadu_si512(b.sum);
  x.unit = _mm512_loadu_ps(b.unit);
  return x;
}

// sum(q * x) - z * sum(x) per lane, in units, for the codes q of 64 packed bytes: l0 + 2^8 l1 + 2^16 l2 from the limbs'
// sums, as two chains, (l2 << 8 carried into l1) << 8 beside l0 (started at -z * sum(x)), which spares two zeroed
// accumulators and an add over three separate sums. (One chain through all three limbs saves no more instructions
// and is longer than a tile of 576 inputs can hide.)
// int32 arithmetic wraps, so only the result needs to fit (|.| < 2^29).
template <bool kAsym>
LS_AVX512_VNNI inline __m512 block_dot(__m512i packed, __m512i zero, const XBlock& x) {
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  const __m512i lo = _mm512_and_si512(packed, nibble), hi = _mm512_and_si512(_mm512_srli_epi16(packed, 4), nibble);
  const __m512i start = _mm512_sub_epi32(_mm512_setzero_si512(),
                                         kAsym ? _mm512_mullo_epi32(zero, x.sum) : _mm512_slli_epi32(x.sum, 3));
  __m512i upper = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, x.lo[2]), hi, x.hi[2]);
  upper = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_slli_epi32(upper, 8), lo, x.lo[1]), hi, x.hi[1]);
  const __m512i lower = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(start, lo, x.lo[0]), hi, x.hi[0]);
  return _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(upper, 8), lower));
}

// A block's scales (zero points) per lane from the 1-4 of its groups in v: lane l is chunk l / 4.
template <int kShift>  // log2(group / 32)
LS_AVX512 inline __m512 lanes_of(__m128 v) {
  const __m512i group_of_lane = _mm512_srli_epi32(_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3), kShift);
  return _mm512_permutexvar_ps(group_of_lane, _mm512_castps128_ps512(v));
}
template <int kShift>
LS_AVX512 inline __m512i lanes_of(__m128i v) {
  return _mm512_castps_si512(lanes_of<kShift>(_mm_castsi128_ps(_mm512_castsi512_si128(_mm512_cvtepu8_epi32(v)))));
}

// Tiles of NR channels x MR rows: full blocks, then the last 1-3 chunks; those of two channels at once (one load,
// half each) when there are two, or each channel alone with masked loads.
template <int NR, int MR, bool kAsym, int kShift>
LS_AVX512_VNNI void int4_vnni_tile(const Problem& p, int64_t n, int64_t m) {
  constexpr int kGroupsPerBlock = 4 >> kShift;
  const int64_t groups = p.K / p.group, chunks = p.K / 32, full = chunks / 4, blocks = (chunks + 3) / 4;
  const int live = int(chunks % 4);
  const uint8_t* w[NR];
  const float* s[NR];
  const uint8_t* z[NR];
  for (int i = 0; i < NR; ++i) {
    w[i] = static_cast<const uint8_t*>(p.w) + (n + i) * (p.K / 2);
    s[i] = p.scales + (n + i) * groups;
    z[i] = kAsym ? p.zeros + (n + i) * groups : nullptr;
  }
  const FixedPointBlock* xb[MR];
  for (int r = 0; r < MR; ++r) xb[r] = p.xfixed + (m + r) * blocks;
  __m512 acc[NR][MR];
  for (int i = 0; i < NR; ++i)
    for (int r = 0; r < MR; ++r) acc[i][r] = _mm512_setzero_ps();

  for (int64_t b = 0; b < full; ++b) {
    const int64_t g = kGroupsPerBlock * b;
    XBlock x[MR];
    for (int r = 0; r < MR; ++r) x[r] = load_block(xb[r][b]);
    for (int i = 0; i < NR; ++i) {
      const __m512i packed = _mm512_loadu_si512(w[i] + 64 * b);
      const __m512 scale = lanes_of<kShift>(kShift == 0 ? _mm_loadu_ps(s[i] + g)
                                            : kShift == 1 ? _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(s[i] + g)))
                                                          : _mm_load_ss(s[i] + g));
      __m512i zero = _mm512_setzero_si512();
      if (kAsym) {
        int32_t bytes = 0;
        std::memcpy(&bytes, z[i] + g, kGroupsPerBlock);
        zero = lanes_of<kShift>(_mm_cvtsi32_si128(bytes));
      }
      for (int r = 0; r < MR; ++r)
        acc[i][r] = _mm512_fmadd_ps(block_dot<kAsym>(packed, zero, x[r]), _mm512_mul_ps(scale, x[r].unit), acc[i][r]);
    }
  }
  if (live) {
    const int64_t g = kGroupsPerBlock * full;
    const int tail_groups = (live + (1 << kShift) - 1) >> kShift;
    const __mmask16 group_mask = __mmask16((1u << tail_groups) - 1);
    XBlock x[MR];
    for (int r = 0; r < MR; ++r) x[r] = load_block(xb[r][full]);
    if (live == 2 && NR % 2 == 0) {
      // Channels i and i + 1 in the lower and upper halves (the x block repeats its two chunks there).
      for (int i = 0; i < NR; i += 2) {
        const __m512i packed = _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[i] + 64 * full))),
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[i + 1] + 64 * full)), 1);
        const __mmask8 upper = __mmask8(group_mask << tail_groups);
        const __m512 scale = lanes_of<kShift>(
            _mm_mask_loadu_ps(_mm_maskz_loadu_ps(group_mask, s[i] + g), upper, s[i + 1] + g - tail_groups));
        __m512i zero = _mm512_setzero_si512();
        if (kAsym)
          zero = lanes_of<kShift>(_mm_mask_loadu_epi8(_mm_maskz_loadu_epi8(group_mask, z[i] + g), upper,
                                                      z[i + 1] + g - tail_groups));
        for (int r = 0; r < MR; ++r) {
          const __m512 part = _mm512_mul_ps(block_dot<kAsym>(packed, zero, x[r]), _mm512_mul_ps(scale, x[r].unit));
          acc[i][r] = _mm512_mask_add_ps(acc[i][r], 0x00FF, acc[i][r], part);
          acc[i + 1][r] = _mm512_mask_add_ps(acc[i + 1][r], 0xFF00, acc[i + 1][r], part);
        }
      }
    } else {
      const __mmask64 bytes = (__mmask64{1} << (16 * live)) - 1;
      for (int i = 0; i < NR; ++i) {
        const __m512i packed = _mm512_maskz_loadu_epi8(bytes, w[i] + 64 * full);
        const __m512 scale = lanes_of<kShift>(_mm_maskz_loadu_ps(group_mask, s[i] + g));
        const __m512i zero = kAsym ? lanes_of<kShift>(_mm_maskz_loadu_epi8(group_mask, z[i] + g)) : _mm512_setzero_si512();
        for (int r = 0; r < MR; ++r)
          acc[i][r] = _mm512_fmadd_ps(block_dot<kAsym>(packed, zero, x[r]), _mm512_mul_ps(scale, x[r].unit), acc[i][r]);
      }
    }
  }
  store_sums(acc, p.y + m * p.N + n, p.N);
}

// w8a8: int16-widened codes, 32 products per step summed pairwise into int32: vpmaddwd + add, or VNNI's fused
// vpdpwssd. Two definitions, because a function compiled for VNNI may use VNNI anywhere in its body.
#define LS_W8A8_TILE(NAME, ATTR, STEP)                                                                          \
  template <int NR, int MR>                                                                                    \
  ATTR void NAME(const Problem& p, int64_t n, int64_t m) {                                                     \
    const int8_t* w = static_cast<const int8_t*>(p.w);                                                         \
    __m512i acc[NR][MR];                                                                                       \
    for (int i = 0; i < NR; ++i)                                                                               \
      for (int r = 0; r < MR; ++r) acc[i][r] = _mm512_setzero_si512();                                         \
    int64_t k = 0;                                                                                             \
    for (; k + 32 <= p.K; k += 32) {                                                                           \
      __m512i xv[MR];                                                                                          \
      for (int r = 0; r < MR; ++r) xv[r] = _mm512_loadu_si512(p.xq + (m + r) * p.K + k);                       \
      for (int i = 0; i < NR; ++i) {                                                                           \
        const __m512i wv =                                                                                     \
            _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (n + i) * p.K + k))); \
        for (int r = 0; r < MR; ++r) acc[i][r] = STEP(acc[i][r], xv[r], wv);                                   \
      }                                                                                                        \
    }                                                                                                          \
    for (int i = 0; i < NR; ++i)                                                                               \
      for (int r = 0; r < MR; ++r) {                                                                           \
        int32_t total = _mm512_reduce_add_epi32(acc[i][r]);                                                    \
        for (int64_t t = k; t < p.K; ++t) total += int32_t(p.xq[(m + r) * p.K + t]) * int32_t(w[(n + i) * p.K + t]); \
        p.y[(m + r) * p.N + n + i] = float(total) * p.xs[m + r] * p.scales[n + i];                            \
      }                                                                                                        \
  }

#define LS_MADD_STEP(acc, x, w) _mm512_add_epi32(acc, _mm512_madd_epi16(x, w))
#define LS_VNNI_STEP(acc, x, w) _mm512_dpwssd_epi32(acc, x, w)
LS_W8A8_TILE(w8a8_tile_madd, LS_AVX512, LS_MADD_STEP)
LS_W8A8_TILE(w8a8_tile_vnni, LS_AVX512_VNNI, LS_VNNI_STEP)

// ---------------------------------------------------------------- AVX2 (8 lanes; for CPUs without AVX-512)

LS_AVX2 inline int32_t hsum8i(__m256i v) {
  const __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  const __m128i t = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1)));
}

template <int NR, int MR>
LS_AVX2 void int8_tile_avx2(const Problem& p, int64_t n, int64_t m) {
  const int8_t* w = static_cast<const int8_t*>(p.w);
  __m256 acc[NR][MR];
  for (int i = 0; i < NR; ++i)
    for (int r = 0; r < MR; ++r) acc[i][r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= p.K; k += 8) {
    __m256 xv[MR];
    for (int r = 0; r < MR; ++r) xv[r] = _mm256_loadu_ps(p.x + (m + r) * p.K + k);
    for (int i = 0; i < NR; ++i) {
      const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + (n + i) * p.K + k));
      const __m256 wv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw));
      for (int r = 0; r < MR; ++r) acc[i][r] = _mm256_fmadd_ps(xv[r], wv, acc[i][r]);
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int r = 0; r < MR; ++r) {
      float tail = 0.f;
      for (int64_t t = k; t < p.K; ++t) tail += p.x[(m + r) * p.K + t] * float(w[(n + i) * p.K + t]);
      p.y[(m + r) * p.N + n + i] = (hsum8(acc[i][r]) + tail) * p.scales[n + i];
    }
}

template <int NR, int MR, bool kAsym>
LS_AVX2 void int4_tile_avx2(const Problem& p, int64_t n, int64_t m) {
  const uint8_t* w = static_cast<const uint8_t*>(p.w);
  const int64_t groups = p.K / p.group, half = p.K / 2;
  const __m128i low = _mm_set1_epi8(0x0F);
  __m256 acc[NR][MR];
  for (int i = 0; i < NR; ++i)
    for (int r = 0; r < MR; ++r) acc[i][r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    // each code becomes its dequantized weight (c - z) * s before the product, exactly dequantize_weight's value:
    // no zero-point correction after the sum to cancel against it, and no x * c to overflow where x * w does not
    __m256 zero[NR], scale[NR];
    for (int i = 0; i < NR; ++i) {
      zero[i] = _mm256_set1_ps(kAsym ? float(p.zeros[(n + i) * groups + g]) : 8.f);
      scale[i] = _mm256_set1_ps(p.scales[(n + i) * groups + g]);
    }
    for (int64_t k = g * p.group; k < (g + 1) * p.group; k += 32) {
      for (int i = 0; i < NR; ++i) {
        const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + (n + i) * half + k / 2));
        const __m128i lo = _mm_and_si128(raw, low), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low);
        const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
        __m256 wv[4];
        for (int j = 0; j < 4; ++j)
          wv[j] = _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[j])), zero[i]), scale[i]);
        for (int r = 0; r < MR; ++r) {
          const float* x = p.x + (m + r) * p.K + k;
          __m256 a = acc[i][r];
          for (int j = 0; j < 4; ++j) a = _mm256_fmadd_ps(_mm256_loadu_ps(x + 8 * j), wv[j], a);
          acc[i][r] = a;
        }
      }
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int r = 0; r < MR; ++r) p.y[(m + r) * p.N + n + i] = hsum8(acc[i][r]);
}

template <int NR, int MR>
LS_AVX2 void w8a8_tile_avx2(const Problem& p, int64_t n, int64_t m) {
  const int8_t* w = static_cast<const int8_t*>(p.w);
  __m256i acc[NR][MR];
  for (int i = 0; i < NR; ++i)
    for (int r = 0; r < MR; ++r) acc[i][r] = _mm256_setzero_si256();
  int64_t k = 0;
  for (; k + 16 <= p.K; k += 16) {
    __m256i xv[MR];
    for (int r = 0; r < MR; ++r) xv[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.xq + (m + r) * p.K + k));
    for (int i = 0; i < NR; ++i) {
      const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + (n + i) * p.K + k)));
      for (int r = 0; r < MR; ++r) acc[i][r] = _mm256_add_epi32(acc[i][r], _mm256_madd_epi16(xv[r], wv));
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int r = 0; r < MR; ++r) {
      int32_t total = hsum8i(acc[i][r]);
      for (int64_t t = k; t < p.K; ++t) total += int32_t(p.xq[(m + r) * p.K + t]) * int32_t(w[(n + i) * p.K + t]);
      p.y[(m + r) * p.N + n + i] = float(total) * p.xs[m + r] * p.scales[n + i];
    }
}

// ---------------------------------------------------------------- dispatch

template <int NR, int MR>
void run_tile(const Problem& p, Scheme scheme, Isa isa, int64_t n, int64_t m) {
  if (isa == Isa::kAvx2) {
    switch (scheme) {
      case Scheme::kInt8: return int8_tile_avx2<NR, MR>(p, n, m);
      case Scheme::kInt4: return int4_tile_avx2<NR, MR, false>(p, n, m);
      case Scheme::kInt4Asym: return int4_tile_avx2<NR, MR, true>(p, n, m);
      case Scheme::kW8A8: return w8a8_tile_avx2<NR, MR>(p, n, m);
    }
  }
  if constexpr (MR <= kFixedPointRows) {
    if (p.xfixed) {
      const bool asym = scheme == Scheme::kInt4Asym;
      switch (p.group) {
        case 32: return asym ? int4_vnni_tile<NR, MR, true, 0>(p, n, m) : int4_vnni_tile<NR, MR, false, 0>(p, n, m);
        case 64: return asym ? int4_vnni_tile<NR, MR, true, 1>(p, n, m) : int4_vnni_tile<NR, MR, false, 1>(p, n, m);
        default: return asym ? int4_vnni_tile<NR, MR, true, 2>(p, n, m) : int4_vnni_tile<NR, MR, false, 2>(p, n, m);
      }
    }
  }
  switch (scheme) {
    case Scheme::kInt8: return int8_tile<NR, MR>(p, n, m);
    case Scheme::kInt4: return p.group == 32 ? int4_tile<NR, MR, false, 1>(p, n, m) : int4_tile<NR, MR, false, 0>(p, n, m);
    case Scheme::kInt4Asym: return p.group == 32 ? int4_tile<NR, MR, true, 1>(p, n, m) : int4_tile<NR, MR, true, 0>(p, n, m);
    case Scheme::kW8A8: return isa >= Isa::kAvx512Vnni ? w8a8_tile_vnni<NR, MR>(p, n, m) : w8a8_tile_madd<NR, MR>(p, n, m);
  }
}

template <int NR>
void run_rows(const Problem& p, Scheme scheme, Isa isa, int64_t n, int64_t m = 0) {
  for (; m + 4 <= p.M; m += 4) run_tile<NR, 4>(p, scheme, isa, n, m);
  switch (p.M - m) {
    case 3: return run_tile<NR, 3>(p, scheme, isa, n, m);
    case 2: return run_tile<NR, 2>(p, scheme, isa, n, m);
    case 1: return run_tile<NR, 1>(p, scheme, isa, n, m);
    default: return;
  }
}

// The packed weight this far ahead of the tile being computed is prefetched while it computes: with several rows
// the FMAs between weight loads fill the out-of-order window and the hardware prefetcher falls behind.
constexpr int64_t kPrefetchBytes = 8192;

void simd_rows(const Problem& p, Scheme scheme, Isa isa, int64_t n0, int64_t n1) {
  // int8 with 8+ rows of a short x (8 rows in L1): tiles of 2 channels x 8 rows widen each weight once for 8 rows.
  const int64_t rows8 = scheme == Scheme::kInt8 && isa != Isa::kAvx2 && p.K <= 1024 ? p.M / 8 * 8 : 0;
  const int64_t row_bytes = scheme == Scheme::kInt4 || scheme == Scheme::kInt4Asym ? p.K / 2 : p.K;
  const char* weight = static_cast<const char*>(p.w);
  const int64_t weight_end = p.N * row_bytes;
  // the bytes kPrefetchBytes past a tile's rows, a cache line at a time
  const auto prefetch_past = [&](int64_t n, int64_t channels) {
    for (int64_t b = n * row_bytes + kPrefetchBytes; b < std::min((n + channels) * row_bytes + kPrefetchBytes, weight_end); b += 64)
      _mm_prefetch(weight + b, _MM_HINT_T0);
  };
  int64_t n = n0;
  // Rows of 2 KB or more at 1-3 rows: tiles of 8 channels, without software prefetch. Eight long row streams keep
  // the hardware prefetcher ahead on their own, and the prefetches only crowd its fill buffers (on the AMX Xeon, int8
  // 4096x4096 at M = 1 took 344 us this way against 513; short rows, 576 inputs, ran 8-20% slower, so they keep the
  // 4-channel tiles and their prefetch).
  if (isa >= Isa::kAvx512 && p.M <= 3 && row_bytes >= 2048)
    for (; n + 8 <= n1; n += 8) run_rows<8>(p, scheme, isa, n);
  // int4 in fixed point (VNNI) on short rows: tiles of 8 channels with their prefetch. A tile ends in a long chain
  // (the last block's dot products, the lane sums) that 4 channels of 576 inputs could not hide: 8 took 1536x576 at
  // M = 1 from 23.4 to 20.9 us on the AMX Xeon, 49152x576 from 558 to 545.
  if (p.xfixed)
    for (; n + 8 <= n1; n += 8) {
      prefetch_past(n, 8);
      run_rows<8>(p, scheme, isa, n);
    }
  for (; n + 4 <= n1; n += 4) {
    prefetch_past(n, 4);
    for (int64_t m = 0; m < rows8; m += 8) {
      int8_tile<2, 8>(p, n, m);
      int8_tile<2, 8>(p, n + 2, m);
    }
    run_rows<4>(p, scheme, isa, n, rows8);
  }
  for (; n < n1; ++n) run_rows<1>(p, scheme, isa, n);
}

#endif  // LS_X86

// w8a8's per-token quantization of finite rows in one pass each, bit for bit quantize_activation_per_token's
// numerics, whose dozen ATen calls cost ~30 us at a decode step's few rows: codes as int16 (the streaming kernels) and
// int8 (AMX), and scales. False if x holds an inf or a NaN (that function's rules then apply).
bool quantize_rows(const float* x, int64_t M, int64_t K, int16_t* codes16, int8_t* codes8, float* scales) {
  for (int64_t m = 0; m < M; ++m) {
    const float* row = x + m * K;
    float lo = 0.f, hi = 0.f;
    bool finite = true;
    for (int64_t k = 0; k < K; ++k) {
      finite &= std::isfinite(row[k]);
      lo = std::min(lo, row[k]);
      hi = std::max(hi, row[k]);
    }
    if (!finite) return false;
    const float scale = exact_scale(std::max(std::max(-lo / 128.f, hi / 127.f), kTinyScale), kInt8SpareBits);
    scales[m] = scale;
    for (int64_t k = 0; k < K; ++k) {
      // clamped, then rounded half to even by adding and taking away 1.5 * 2^23: round-then-clamp's codes
      const float clamped = std::min(std::max(row[k] / scale, -128.f), 127.f);
      const float code = (clamped + 12582912.f) - 12582912.f;
      codes16[m * K + k] = int16_t(code);
      codes8[m * K + k] = int8_t(code);
    }
  }
  return true;
}

// int8's SIMD tiles sum x * code and scale the sum once per channel, so an |x| near float32's limit could overflow
// there where x * (code * scale) does not: such a call dequantizes first, like a large M.
bool has_huge_value(const float* x, int64_t n) {
  bool huge = false;
  for (int64_t i = 0; i < n; ++i) huge |= std::fabs(x[i]) >= 0x1p100f;
  return huge;
}

// The dequantized fp32 weight (large M), with the same formulas as the streaming kernels; chunk loops that the
// compiler vectorizes.
at::Tensor dequantize(const Problem& p, Scheme scheme) {
  auto out = at::empty({p.N, p.K}, at::kFloat);
  float* dst = out.data_ptr<float>();
  const bool per_channel = scheme == Scheme::kInt8 || scheme == Scheme::kW8A8;
  const int64_t groups = per_channel ? 1 : p.K / p.group;
  at::parallel_for(0, p.N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      float* row_out = dst + n * p.K;
      if (per_channel) {
        const int8_t* w = static_cast<const int8_t*>(p.w) + n * p.K;
        const float s = p.scales[n];
        for (int64_t k = 0; k < p.K; ++k) row_out[k] = float(w[k]) * s;
        continue;
      }
      const uint8_t* w = static_cast<const uint8_t*>(p.w) + n * (p.K / 2);
      for (int64_t k = 0; k < p.K; k += 32) {
        const int64_t g = k / p.group;
        const float s = p.scales[n * groups + g];
        const int z = scheme == Scheme::kInt4 ? 8 : p.zeros[n * groups + g];
        const uint8_t* chunk = w + k / 2;
        for (int j = 0; j < 16; ++j) {
          row_out[k + j] = float(int(chunk[j] & 0x0F) - z) * s;
          row_out[k + 16 + j] = float(int(chunk[j] >> 4) - z) * s;
        }
      }
    }
  });
  return out;
}

}  // namespace

std::string qmatmul_cpu_isa() {
  switch (select_isa()) {
    case Isa::kAmx: return "amx";
    case Isa::kAvx512Vnni: return "avx512_vnni";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "generic";
  }
}

at::Tensor quantized_linear_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                                const std::optional<at::Tensor>& zeros, const std::string& scheme_name,
                                int64_t group_size, const std::optional<at::Tensor>& bias) {
  Scheme scheme;
  int64_t N, K;
  std::tie(scheme, N, K) = check_quantized_linear_args(x, packed, scales, zeros, scheme_name, group_size, bias);
  const bool grouped = scheme == Scheme::kInt4 || scheme == Scheme::kInt4Asym;
  // A decode step's call takes microseconds: no views or copies of x unless it is bf16 or strided.
  const auto x_float = x.scalar_type() == at::kFloat && x.is_contiguous() ? x : x.to(at::kFloat).contiguous();
  const int64_t M = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  at::DimVector out_shape(x.sizes());
  out_shape.back() = N;
  const auto w = packed.contiguous();
  const auto s = scales.contiguous();
  const auto z = zeros ? zeros->contiguous() : at::Tensor();
  if (z.defined()) {  // the numerics' zero points are 0..15, and the VNNI path's int32 lane sums hold z * sum(x) only for those
    const uint8_t* zp = z.data_ptr<uint8_t>();
    uint8_t bits = 0;
    for (int64_t i = 0; i < z.numel(); ++i) bits |= zp[i];
    TORCH_CHECK_VALUE(bits < 16, "quantized_linear: int4_asym zeros must be integers in [0, 15]");
  }
  Problem p{x_float.data_ptr<float>(), nullptr, nullptr, nullptr, w.data_ptr(), s.data_ptr<float>(),
            z.defined() ? z.data_ptr<uint8_t>() : nullptr, nullptr, M, N, K, grouped ? group_size : K};

  at::Tensor codes, xq16, xq8, xs;  // w8a8: codes as floats for large M (and non-finite rows), as integers for few
  if (scheme == Scheme::kW8A8) {
    const bool few_rows = M > 0 && M <= kStreamRows;  // the streaming and AMX kernels', which read integer codes
    if (few_rows) {
      xq16 = at::empty({M, K}, at::kShort);
      xq8 = at::empty({M, K}, at::kChar);
      xs = at::empty({M}, at::kFloat);
    }
    if (!few_rows || !quantize_rows(p.x, M, K, xq16.data_ptr<int16_t>(), xq8.data_ptr<int8_t>(), xs.data_ptr<float>())) {
      std::tie(codes, xs) = quantize_activation_per_token(x_float.view({M, K}));
      if (few_rows) {
        xq16 = codes.to(at::kShort).contiguous();
        xq8 = codes.to(at::kChar).contiguous();
      }
    }
    p.xq = few_rows ? xq16.data_ptr<int16_t>() : nullptr;
    p.xs = xs.data_ptr<float>();
  }

  const auto finish = [&](at::Tensor& y) {
    if (bias) y.add_(*bias);
    return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
  };
  Isa isa = select_isa();
  if (isa == Isa::kAmx && scheme == Scheme::kInt8 && M >= 1 && M <= kAmxFixedPointRows && K < kAmxFixedPointMaxK) {
    at::Tensor y = at::empty(out_shape, at::kFloat);  // any finite x, however large: its fixed point is scaled to it
    if (amx_int8_fixed_point_linear(p.x, static_cast<const int8_t*>(p.w), p.scales, y.data_ptr<float>(), M, N, K))
      return finish(y);
  }
  const bool stream = M > 0 && M <= kStreamRows && !(scheme == Scheme::kInt8 && isa != Isa::kGeneric && has_huge_value(p.x, M * K));
#ifdef LS_X86
  std::unique_ptr<FixedPointBlock[]> xfixed;  // uninitialized: to_fixed_point writes every byte the kernel reads
  if (stream && grouped && isa >= Isa::kAvx512Vnni && M <= kFixedPointRows) {
    const int64_t blocks = (K / 32 + 3) / 4;
    xfixed.reset(new FixedPointBlock[M * blocks]);
    bool finite = true;
    for (int64_t m = 0; m < M && finite; ++m) finite = to_fixed_point(p.x + m * K, K, &xfixed[m * blocks]);
    if (finite) p.xfixed = xfixed.get();
  }
#endif

  at::Tensor y;
  if (!stream) {
    // w8a8: the activation as its codes times its scale
    y = at::linear(scheme == Scheme::kW8A8 ? codes * xs.unsqueeze(1) : x_float.view({M, K}), dequantize(p, scheme)).view(out_shape);
  } else {
    y = at::empty(out_shape, at::kFloat);
    p.y = y.data_ptr<float>();
  }
  const bool amx = stream && isa == Isa::kAmx && M >= amx_min_rows(scheme) && M <= kAmxMaxRows;
  bool done = !stream;
  if (amx && scheme == Scheme::kW8A8) {
    amx_w8a8_linear(xq8.data_ptr<int8_t>(), p.xs, static_cast<const int8_t*>(p.w), p.scales, p.y, M, N, K);
    done = true;
  } else if (amx) {
    done = amx_quantized_linear(p.x, p.w, p.scales, p.zeros, scheme, p.group, p.y, M, N, K);
  }
  if (!done) {
    const int64_t tiles = (N + 3) / 4;
    // A thread per ~512K multiply-adds at least: waking a second thread costs more than a small layer's product.
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 19) / (4 * K * M));
    at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
      const int64_t n0 = t0 * 4, n1 = std::min(N, t1 * 4);
#ifdef LS_X86
      if (isa != Isa::kGeneric) return simd_rows(p, scheme, isa, n0, n1);
#endif
      generic_rows(p, scheme, n0, n1);
    });
  }
  return finish(y);
}

}  // namespace lightning_spec
