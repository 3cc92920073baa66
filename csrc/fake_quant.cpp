// CPU kernel of lightning_spec::fake_quantize. QAT fake-quantizes every weight each step; in PyTorch ops that is
// about seven passes over the weight (abs, amax, divide, round, compare, clamp, multiply). Here each group is read
// from cache after its first touch: its scale observed (optionally), then out and the inside mask written.
// Paths, chosen at run time as quantized_linear's: AVX-512 (F+BW+VL) and plain C++ for any other CPU.
#include "fake_quant.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "fake_quant_checks.h"
#include "qmatmul.h"

namespace lightning_spec {
namespace {

struct Group {
  const float* x;
  float* out;
  bool* inside;
  float* scale;
  float* zero;
};

// Exactly numerics.weight_qparams from a group's min (clamped to <= 0) and max (clamped to >= 0): float32
// arithmetic in the same order (no FMA contraction). A NaN in the group makes them NaN, as torch's amin/amax do
// (std::min/max and the SIMD min/max skip it).
void set_qparams(const Group& g, const FakeQuantParams& p, float lo, float hi, bool nan) {
  if (nan) {
    *g.scale = std::numeric_limits<float>::quiet_NaN();
    if (p.asym) *g.zero = std::numeric_limits<float>::quiet_NaN();
  } else if (p.asym) {
    const float s = exact_scale(std::max((hi - lo) / 15.f, kTinyScale), p.spare_bits);
    *g.scale = s;
    *g.zero = std::min(std::max(std::nearbyint(-lo / s), 0.f), 15.f);
  } else {
    *g.scale = exact_scale(std::max(std::max(-lo / -p.qmin, hi / p.qmax), kTinyScale), p.spare_bits);
  }
}

void observe_group(const Group& g, const FakeQuantParams& p) {
  float lo = 0.f, hi = 0.f;
  bool nan = false;
  for (int64_t j = 0; j < p.group; ++j) {
    lo = std::min(lo, g.x[j]);
    hi = std::max(hi, g.x[j]);
    nan |= std::isnan(g.x[j]);
  }
  set_qparams(g, p, lo, hi, nan);
}

template <bool kAsym>
void quantize_group(const Group& g, const FakeQuantParams& p) {
  const float s = *g.scale, z = kAsym ? *g.zero : 0.f, qmin = p.qmin, qmax = p.qmax;
  for (int64_t j = 0; j < p.group; ++j) {
    float c = std::nearbyint(g.x[j] / s);  // torch.round: half to even
    if (kAsym) c += z;  // symmetric codes skip it: -0.0 + 0.0 would turn the sign of a zero
    g.inside[j] = c >= qmin && c <= qmax;
    c = c < qmin ? qmin : (c > qmax ? qmax : c);
    g.out[j] = kAsym ? (c - z) * s : c * s;
  }
}

void groups_generic(const Group& base, const FakeQuantParams& p, bool observe, int64_t g0, int64_t g1) {
  for (int64_t i = g0; i < g1; ++i) {
    const int64_t offset = i * p.group;
    const Group g{base.x + offset, base.out + offset, base.inside + offset, base.scale + i,
                  p.asym ? base.zero + i : nullptr};
    if (observe) observe_group(g, p);
    p.asym ? quantize_group<true>(g, p) : quantize_group<false>(g, p);
  }
}

#if defined(__x86_64__)
#define LS_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

// The same expressions as the loops above, 16 inputs at a time (masked tails: a per-row group can be any length).
template <bool kAsym>
LS_AVX512 void group_avx512(const Group& g, const FakeQuantParams& p, bool observe) {
  if (observe) {
    __m512 lo = _mm512_setzero_ps(), hi = _mm512_setzero_ps();  // masked-off lanes load 0: neutral here
    __mmask16 nan = 0;
    for (int64_t j = 0; j < p.group; j += 16) {
      const __mmask16 m = p.group - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (p.group - j)) - 1);
      const __m512 v = _mm512_maskz_loadu_ps(m, g.x + j);
      lo = _mm512_min_ps(lo, v);
      hi = _mm512_max_ps(hi, v);
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    }
    set_qparams(g, p, _mm512_reduce_min_ps(lo), _mm512_reduce_max_ps(hi), nan != 0);
  }
  const __m512 s = _mm512_set1_ps(*g.scale), z = _mm512_set1_ps(kAsym ? *g.zero : 0.f);
  const __m512 qmin = _mm512_set1_ps(p.qmin), qmax = _mm512_set1_ps(p.qmax);
  const __m128i one = _mm_set1_epi8(1);
  for (int64_t j = 0; j < p.group; j += 16) {
    const __mmask16 m = p.group - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (p.group - j)) - 1);
    __m512 c = _mm512_roundscale_ps(_mm512_div_ps(_mm512_maskz_loadu_ps(m, g.x + j), s),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    if (kAsym) c = _mm512_add_ps(c, z);
    const __mmask16 in = _mm512_cmp_ps_mask(c, qmin, _CMP_GE_OQ) & _mm512_cmp_ps_mask(c, qmax, _CMP_LE_OQ);
    c = _mm512_min_ps(qmax, _mm512_max_ps(qmin, c));  // operands in this order keep a NaN, as the clamp above
    _mm512_mask_storeu_ps(g.out + j, m, _mm512_mul_ps(kAsym ? _mm512_sub_ps(c, z) : c, s));
    _mm_mask_storeu_epi8(g.inside + j, m, _mm_maskz_mov_epi8(in, one));
  }
}

LS_AVX512 void groups_avx512(const Group& base, const FakeQuantParams& p, bool observe, int64_t g0, int64_t g1) {
  for (int64_t i = g0; i < g1; ++i) {
    const int64_t offset = i * p.group;
    const Group g{base.x + offset, base.out + offset, base.inside + offset, base.scale + i,
                  p.asym ? base.zero + i : nullptr};
    p.asym ? group_avx512<true>(g, p, observe) : group_avx512<false>(g, p, observe);
  }
}

#endif

}  // namespace

std::tuple<at::Tensor, at::Tensor> fake_quantize_cpu(const at::Tensor& input, at::Tensor& scale,
                                                     const std::optional<at::Tensor>& zero, const std::string& scheme,
                                                     int64_t group_size, bool observe) {
  const FakeQuantParams p = check_fake_quantize_args(input, scale, zero, scheme, group_size);
  const auto x = input.contiguous();
  auto out = at::empty_like(x);
  auto inside = at::empty(x.sizes(), x.options().dtype(at::kBool));
  const Group base{x.data_ptr<float>(), out.data_ptr<float>(), inside.data_ptr<bool>(), scale.data_ptr<float>(),
                   p.asym ? zero->data_ptr<float>() : nullptr};
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / p.group);  // a thread per ~64K inputs at least
  // the CPU kernels' one ISA choice (LIGHTNING_SPEC_QMATMUL_ISA caps it, for tests)
  const bool avx512 = qmatmul_cpu_isa().rfind("avx512", 0) == 0;
  at::parallel_for(0, p.rows * p.groups, grain, [&](int64_t g0, int64_t g1) {
#if defined(__x86_64__)
    if (avx512) return groups_avx512(base, p, observe, g0, g1);
#endif
    groups_generic(base, p, observe, g0, g1);
  });
  return {out, inside};
}

}  // namespace lightning_spec
