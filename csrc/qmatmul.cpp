// CPU kernels of lightning_spec::quantized_linear: y = x @ dequant(W)^T (+ bias).
//
// Small M (decode and verification batches, M <= kStreamRows): the weight is streamed once; each tile of NR
// output channels x MR rows keeps NR*MR accumulators, and each weight chunk is widened once for all MR rows.
// at::parallel_for splits the output channels. Large M is compute-bound: dequantize once and let ATen's GEMM run.
// Paths, chosen at run time (cpu_isa.h): AVX-512 (VNNI for w8a8's int16 dot), AVX2+FMA, plain C++.
#include "qmatmul.h"

#include <ATen/Parallel.h>

#include "cpu_isa.h"
#include "qmatmul_checks.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace lightning_spec {
namespace {

constexpr int64_t kStreamRows = 16;

struct Problem {
  const float* x;      // [M, K] fp32
  const int16_t* xq;   // w8a8: [M, K] activation codes
  const float* xs;     // w8a8: [M] activation scales
  const float* xsum;   // int4 on AVX2: [M, K / group] group sums of x
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
  for (int i = 0; i < NR; ++i)
    for (int r = 0; r < MR; ++r) {
      float tail = 0.f;
      for (int64_t t = k; t < p.K; ++t) tail += p.x[(m + r) * p.K + t] * float(w[(n + i) * p.K + t]);
      p.y[(m + r) * p.N + n + i] = (hsum(acc[i][r]) + tail) * p.scales[n + i];
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
  for (int i = 0; i < NR; ++i)
    for (int r = 0; r < MR; ++r) p.y[(m + r) * p.N + n + i] = hsum(acc[i][r]);
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
    __m256 gacc[NR][MR];
    for (int i = 0; i < NR; ++i)
      for (int r = 0; r < MR; ++r) gacc[i][r] = _mm256_setzero_ps();
    for (int64_t k = g * p.group; k < (g + 1) * p.group; k += 32) {
      for (int i = 0; i < NR; ++i) {
        const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + (n + i) * half + k / 2));
        const __m128i lo = _mm_and_si128(raw, low), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low);
        const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
        const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
        const __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
        const __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
        for (int r = 0; r < MR; ++r) {
          const float* x = p.x + (m + r) * p.K + k;
          __m256 a = _mm256_fmadd_ps(_mm256_loadu_ps(x), w0, gacc[i][r]);
          a = _mm256_fmadd_ps(_mm256_loadu_ps(x + 8), w1, a);
          a = _mm256_fmadd_ps(_mm256_loadu_ps(x + 16), w2, a);
          gacc[i][r] = _mm256_fmadd_ps(_mm256_loadu_ps(x + 24), w3, a);
        }
      }
    }
    for (int i = 0; i < NR; ++i) {
      const __m256 sv = _mm256_set1_ps(p.scales[(n + i) * groups + g]);
      for (int r = 0; r < MR; ++r) acc[i][r] = _mm256_fmadd_ps(gacc[i][r], sv, acc[i][r]);
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int r = 0; r < MR; ++r) {
      float zero = 0.f;
      for (int64_t g = 0; g < groups; ++g)
        zero += p.scales[(n + i) * groups + g] * (kAsym ? float(p.zeros[(n + i) * groups + g]) : 8.f) * p.xsum[(m + r) * groups + g];
      p.y[(m + r) * p.N + n + i] = hsum8(acc[i][r]) - zero;
    }
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
  switch (scheme) {
    case Scheme::kInt8: return int8_tile<NR, MR>(p, n, m);
    case Scheme::kInt4: return p.group == 32 ? int4_tile<NR, MR, false, 1>(p, n, m) : int4_tile<NR, MR, false, 0>(p, n, m);
    case Scheme::kInt4Asym: return p.group == 32 ? int4_tile<NR, MR, true, 1>(p, n, m) : int4_tile<NR, MR, true, 0>(p, n, m);
    case Scheme::kW8A8: return isa == Isa::kAvx512Vnni ? w8a8_tile_vnni<NR, MR>(p, n, m) : w8a8_tile_madd<NR, MR>(p, n, m);
  }
}

template <int NR>
void run_rows(const Problem& p, Scheme scheme, Isa isa, int64_t n) {
  int64_t m = 0;
  for (; m + 4 <= p.M; m += 4) run_tile<NR, 4>(p, scheme, isa, n, m);
  switch (p.M - m) {
    case 3: return run_tile<NR, 3>(p, scheme, isa, n, m);
    case 2: return run_tile<NR, 2>(p, scheme, isa, n, m);
    case 1: return run_tile<NR, 1>(p, scheme, isa, n, m);
    default: return;
  }
}

void simd_rows(const Problem& p, Scheme scheme, Isa isa, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) run_rows<4>(p, scheme, isa, n);
  for (; n < n1; ++n) run_rows<1>(p, scheme, isa, n);
}

#endif  // LS_X86

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
  Problem p{x_float.data_ptr<float>(), nullptr, nullptr, nullptr, w.data_ptr(), s.data_ptr<float>(),
            z.defined() ? z.data_ptr<uint8_t>() : nullptr, nullptr, M, N, K, grouped ? group_size : K};

  at::Tensor xq16, xs;
  at::Tensor xdq;  // w8a8 with large M: the activation as its codes times its scale
  if (scheme == Scheme::kW8A8) {
    at::Tensor codes;
    std::tie(codes, xs) = quantize_activation_per_token(x_float.view({M, K}));
    xq16 = codes.to(at::kShort).contiguous();
    xdq = codes * xs.unsqueeze(1);
    p.xq = xq16.data_ptr<int16_t>();
    p.xs = xs.data_ptr<float>();
  }

  const bool stream = M > 0 && M <= kStreamRows;
  const Isa isa = select_isa();
  std::vector<float> xsum;
  if (stream && grouped && isa == Isa::kAvx2) {
    xsum.assign(M * (K / group_size), 0.f);
    for (int64_t i = 0; i < M * K; ++i) xsum[i / group_size] += p.x[i];
    p.xsum = xsum.data();
  }

  at::Tensor y;
  if (!stream) {
    y = at::linear(scheme == Scheme::kW8A8 ? xdq : x_float.view({M, K}), dequantize(p, scheme)).view(out_shape);
  } else {
    y = at::empty(out_shape, at::kFloat);
    p.y = y.data_ptr<float>();
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
  if (bias) y.add_(*bias);
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace lightning_spec
