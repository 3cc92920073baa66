// Which SIMD path the CPU kernels (quantized_linear, small_batch_linear) take, chosen once at run time:
// AVX-512 (F+BW+VL; with VNNI for w8a8), AVX2+FMA, or plain C++ for any other CPU.
// LIGHTNING_SPEC_QMATMUL_ISA=generic|avx2|avx512 caps it (for tests).
#pragma once
#include <cstdlib>
#include <string>

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

}  // namespace lightning_spec
