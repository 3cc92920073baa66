// Which SIMD path the CPU kernels (quantized_linear, small_batch_linear) take, chosen once at run time:
// AMX (bf16 and int8 tile multiplies, with AVX-512 BF16, VBMI and VNNI), AVX-512 (F+BW+VL; with VNNI for w8a8),
// AVX2+FMA, or plain C++ for any other CPU. LIGHTNING_SPEC_QMATMUL_ISA=generic|avx2|avx512|avx512_vnni caps it (for tests). Also
// the target attributes and lane sums the paths share.
#pragma once
#include <cstdlib>
#include <string>

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define LS_X86 1
#define LS_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,fma")))
#define LS_AVX512_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma")))
#define LS_AVX2 __attribute__((target("avx2,fma")))
#define LS_AMX __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512bf16,amx-tile,amx-bf16,amx-int8,fma")))
#endif

namespace lightning_spec {

enum class Isa { kGeneric, kAvx2, kAvx512, kAvx512Vnni, kAmx };  // each path has the features of those before it

#ifdef LS_X86
// AMX-TILE, AMX-BF16 and AMX-INT8 (CPUID leaf 7: EDX bits 24, 22 and 25), and Linux's leave to use the 8 KB of tile
// data, which a process must ask for once (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA) before its first
// tile instruction.
inline bool amx_usable() {
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) || !(edx >> 24 & 1) || !(edx >> 22 & 1) || !(edx >> 25 & 1))
    return false;
  constexpr int kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
}
#endif

inline Isa select_isa() {
#if !defined(__x86_64__)
  return Isa::kGeneric;
#else
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  static const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512vl");
  static const bool vnni = avx512 && __builtin_cpu_supports("avx512vnni");
  static const bool amx = vnni && __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vbmi") && amx_usable();
  const char* cap = std::getenv("LIGHTNING_SPEC_QMATMUL_ISA");
  const std::string limit = cap ? cap : "";
  if (limit == "generic" || !avx2) return Isa::kGeneric;
  if (limit == "avx2" || !avx512) return Isa::kAvx2;
  if (limit == "avx512" || !vnni) return Isa::kAvx512;
  return limit == "avx512_vnni" || !amx ? Isa::kAvx512Vnni : Isa::kAmx;
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
