// Which SIMD path the CPU kernels (quantized_linear, small_batch_linear) take, chosen once at run time:
// AVX-512 (F+BW+VL; with VNNI for w8a8), AVX2+FMA, or plain C++ for any other CPU.
// LIGHTNING_SPEC_QMATMUL_ISA=generic|avx2|avx512 caps it (for tests). Also the target attributes and lane sums
// the paths share.
#pragma once
#include <cstdlib>
#include <string>

#if defined(__x86_64__)
#include <immintrin.h>
#define LS_X86 1
#define LS_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,fma")))
#define LS_AVX512_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma")))
#define LS_AVX2 __attribute__((target("avx2,fma")))
#endif

namespace lightning_spec {

enum class Isa { kGeneric, kAvx2, kAvx512, kAvx512Vnni };

inline Isa select_isa() {
#if !defined(__x86_64__)
  return Isa::kGeneric;
#else
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  static const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512vl");
  static const bool vnni = avx512 && __builtin_cpu_supports("avx512vnni");
  const char* cap = std::getenv("LIGHTNING_SPEC_QMATMUL_ISA");
  const std::string limit = cap ? cap : "";
  if (limit == "generic" || !avx2) return Isa::kGeneric;
  if (limit == "avx2" || !avx512) return Isa::kAvx2;
  return vnni && limit != "avx512" ? Isa::kAvx512Vnni : Isa::kAvx512;
#endif
}

#ifdef LS_X86
LS_AVX2 inline float hsum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}
#endif

}  // namespace lightning_spec
