// CPU kernels of lightning_spec::quantized_linear: y = x @ dequant(W)^T (+ bias).
//
// Small M (decode and verification batches, M <= kStreamRows): the weight is streamed once; each tile of NR
// output channels x MR rows keeps NR*MR accumulators, and each weight chunk is widened once for all MR rows.
// OpenMP splits the output channels. Large M is compute-bound: dequantize once and let ATen's GEMM run.
// Paths: AVX-512 (F+BW; VNNI for w8a8's int16 dot) chosen at run time, and plain C++ for any other x86/ARM CPU.
#include "qmatmul.h"
#include "qmatmul_checks.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace lightning_spec {
namespace {

constexpr int64_t kStreamRows = 16;

struct Problem {
  const float* x;      // [M, K] fp32
  const int16_t* xq;   // w8a8: [M, K] activation codes
  const float* xs;     // w8a8: [M] activation scales
  const float* xsum;   // int4: [M, K / group] group sums of x
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

// ---------------------------------------------------------------- AVX-512

#define LS_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,fma")))
#define LS_AVX512_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma")))

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

// sum over groups of s_g * z_g * xsum_g: the zero points' share of one output, 16 groups per step.
template <bool kAsym>
LS_AVX512 float zero_dot(const float* scales, const uint8_t* zeros, const float* xsum, int64_t groups) {
  __m512 acc = _mm512_setzero_ps();
  int64_t g = 0;
  for (; g + 16 <= groups; g += 16) {
    const __m512 z = kAsym ? _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(zeros + g))))
                           : _mm512_set1_ps(8.f);
    acc = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_loadu_ps(scales + g), z), _mm512_loadu_ps(xsum + g), acc);
  }
  float total = hsum(acc);
  for (; g < groups; ++g) total += scales[g] * (kAsym ? float(zeros[g]) : 8.f) * xsum[g];
  return total;
}

// int4 (symmetric or with zero points), K a multiple of the group size (itself a multiple of 32). The zero point
// is taken out of the inner loop: sum x (q - z) = sum x q - z sum x, with the group sums of x (xsum) made once per
// call and applied once per output (zero_dot), so each 32-weight chunk costs two widenings, two conversions and
// two FMAs per row.
template <int NR, int MR, bool kAsym>
LS_AVX512 void int4_tile(const Problem& p, int64_t n, int64_t m) {
  const uint8_t* w = static_cast<const uint8_t*>(p.w);
  const int64_t groups = p.K / p.group, half = p.K / 2;
  const __m128i low = _mm_set1_epi8(0x0F);
  __m512 acc[NR][MR];
  for (int i = 0; i < NR; ++i)
    for (int r = 0; r < MR; ++r) acc[i][r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 gacc[NR][MR];
    for (int i = 0; i < NR; ++i)
      for (int r = 0; r < MR; ++r) gacc[i][r] = _mm512_setzero_ps();
    for (int64_t k = g * p.group; k < (g + 1) * p.group; k += 32) {
      __m512 xlo[MR], xhi[MR];
      for (int r = 0; r < MR; ++r) {
        xlo[r] = _mm512_loadu_ps(p.x + (m + r) * p.K + k);
        xhi[r] = _mm512_loadu_ps(p.x + (m + r) * p.K + k + 16);
      }
      for (int i = 0; i < NR; ++i) {
        const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + (n + i) * half + k / 2));
        const __m512 wlo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(raw, low)));
        const __m512 whi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(raw, 4), low)));
        for (int r = 0; r < MR; ++r) gacc[i][r] = _mm512_fmadd_ps(xhi[r], whi, _mm512_fmadd_ps(xlo[r], wlo, gacc[i][r]));
      }
    }
    for (int i = 0; i < NR; ++i) {
      const __m512 sv = _mm512_set1_ps(p.scales[(n + i) * groups + g]);
      for (int r = 0; r < MR; ++r) acc[i][r] = _mm512_fmadd_ps(gacc[i][r], sv, acc[i][r]);
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int r = 0; r < MR; ++r)
      p.y[(m + r) * p.N + n + i] =
          hsum(acc[i][r]) - zero_dot<kAsym>(p.scales + (n + i) * groups, p.zeros ? p.zeros + (n + i) * groups : nullptr,
                                            p.xsum + (m + r) * groups, groups);
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

template <int NR, int MR>
void run_tile(const Problem& p, Scheme scheme, bool vnni, int64_t n, int64_t m) {
  switch (scheme) {
    case Scheme::kInt8: return int8_tile<NR, MR>(p, n, m);
    case Scheme::kInt4: return int4_tile<NR, MR, false>(p, n, m);
    case Scheme::kInt4Asym: return int4_tile<NR, MR, true>(p, n, m);
    case Scheme::kW8A8: return vnni ? w8a8_tile_vnni<NR, MR>(p, n, m) : w8a8_tile_madd<NR, MR>(p, n, m);
  }
}

template <int NR>
void run_rows(const Problem& p, Scheme scheme, bool vnni, int64_t n) {
  int64_t m = 0;
  for (; m + 4 <= p.M; m += 4) run_tile<NR, 4>(p, scheme, vnni, n, m);
  switch (p.M - m) {
    case 3: return run_tile<NR, 3>(p, scheme, vnni, n, m);
    case 2: return run_tile<NR, 2>(p, scheme, vnni, n, m);
    case 1: return run_tile<NR, 1>(p, scheme, vnni, n, m);
    default: return;
  }
}

void avx512_rows(const Problem& p, Scheme scheme, bool vnni, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) run_rows<4>(p, scheme, vnni, n);
  for (; n < n1; ++n) run_rows<1>(p, scheme, vnni, n);
}

bool cpu_has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma");
  return has;
}

bool cpu_has_vnni() {
  static const bool has = cpu_has_avx512() && __builtin_cpu_supports("avx512vnni");
  return has;
}

bool generic_forced() {
  const char* isa = std::getenv("LIGHTNING_SPEC_QMATMUL_ISA");
  return isa != nullptr && std::strcmp(isa, "generic") == 0;
}

// The dequantized fp32 weight (large M), with the same formulas as the streaming kernels.
at::Tensor dequantize(const Problem& p, Scheme scheme) {
  auto out = at::empty({p.N, p.K}, at::kFloat);
  float* dst = out.data_ptr<float>();
  const int64_t groups = scheme == Scheme::kInt8 || scheme == Scheme::kW8A8 ? 1 : p.K / p.group;
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < p.N; ++n) {
    if (scheme == Scheme::kInt8 || scheme == Scheme::kW8A8) {
      const int8_t* w = static_cast<const int8_t*>(p.w) + n * p.K;
      for (int64_t k = 0; k < p.K; ++k) dst[n * p.K + k] = float(w[k]) * p.scales[n];
    } else {
      const uint8_t* w = static_cast<const uint8_t*>(p.w) + n * (p.K / 2);
      for (int64_t k = 0; k < p.K; ++k) {
        const uint8_t byte = w[(k / 32) * 16 + (k % 16)];
        const int q = (k % 32) < 16 ? (byte & 0x0F) : (byte >> 4);
        const int64_t g = k / p.group;
        const int z = scheme == Scheme::kInt4 ? 8 : p.zeros[n * groups + g];
        dst[n * p.K + k] = float(q - z) * p.scales[n * groups + g];
      }
    }
  }
  return out;
}

}  // namespace

std::string qmatmul_cpu_isa() {
  if (generic_forced() || !cpu_has_avx512()) return "generic";
  return cpu_has_vnni() ? "avx512_vnni" : "avx512";
}

at::Tensor quantized_linear_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                                const std::optional<at::Tensor>& zeros, const std::string& scheme_name,
                                int64_t group_size, const std::optional<at::Tensor>& bias) {
  Scheme scheme;
  int64_t N, K;
  std::tie(scheme, N, K) = check_quantized_linear_args(x, packed, scales, zeros, scheme_name, group_size, bias);
  const bool grouped = scheme == Scheme::kInt4 || scheme == Scheme::kInt4Asym;
  const auto x2 = x.reshape({-1, K}).to(at::kFloat).contiguous();
  const int64_t M = x2.size(0);
  const auto w = packed.contiguous();
  const auto s = scales.contiguous();
  const auto z = zeros ? zeros->contiguous() : at::Tensor();
  Problem p{x2.data_ptr<float>(), nullptr, nullptr, nullptr, w.data_ptr(), s.data_ptr<float>(),
            z.defined() ? z.data_ptr<uint8_t>() : nullptr, nullptr, M, N, K, grouped ? group_size : K};

  at::Tensor xq16, xs;
  at::Tensor xdq;  // w8a8 with large M: the activation as its codes times its scale
  if (scheme == Scheme::kW8A8) {
    xs = (x2.abs().amax({1}) / 127.5f).clamp_min(1e-12f);
    const auto codes = at::clamp(at::round(x2 / xs.unsqueeze(1)), -128, 127);
    xq16 = codes.to(at::kShort).contiguous();
    xdq = codes * xs.unsqueeze(1);
    p.xq = xq16.data_ptr<int16_t>();
    p.xs = xs.data_ptr<float>();
  }

  std::vector<float> xsum;
  if (grouped) {
    xsum.assign(M * (K / group_size), 0.f);
    for (int64_t i = 0; i < M * K; ++i) xsum[i / group_size] += p.x[i];
    p.xsum = xsum.data();
  }

  at::Tensor y;
  if (M > kStreamRows || M == 0) {
    y = at::linear(scheme == Scheme::kW8A8 ? xdq : x2, dequantize(p, scheme));
  } else {
    y = at::empty({M, N}, at::kFloat);
    p.y = y.data_ptr<float>();
    const bool simd = !generic_forced() && cpu_has_avx512();
    const bool vnni = cpu_has_vnni();
    const int64_t tiles = (N + 3) / 4;
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t n0 = t * 4, n1 = std::min(N, n0 + 4);
      if (simd)
        avx512_rows(p, scheme, vnni, n0, n1);
      else
        generic_rows(p, scheme, n0, n1);
    }
  }
  if (bias) y = y + bias->to(at::kFloat);
  auto out_shape = x.sizes().vec();
  out_shape.back() = N;
  return y.to(x.scalar_type()).reshape(out_shape);
}

}  // namespace lightning_spec
