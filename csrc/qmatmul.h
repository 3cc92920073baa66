// Kernels of lightning_spec::quantized_linear (registered in ops.cpp); numerics in lightning_spec/quant/numerics.py.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <string>

namespace lightning_spec {

at::Tensor quantized_linear_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                                const std::optional<at::Tensor>& zeros, const std::string& scheme, int64_t group_size,
                                const std::optional<at::Tensor>& bias);

at::Tensor quantized_linear_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                                 const std::optional<at::Tensor>& zeros, const std::string& scheme, int64_t group_size,
                                 const std::optional<at::Tensor>& bias);

// Which CPU path quantized_linear takes: "amx", "avx512_vnni", "avx512", "avx2" or "generic"
// (LIGHTNING_SPEC_QMATMUL_ISA=generic|avx2|avx512|avx512_vnni caps it, for tests).
std::string qmatmul_cpu_isa();

}  // namespace lightning_spec
