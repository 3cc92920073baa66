// Kernels of lightning_spec::fake_quantize (registered in ops.cpp): the QAT forward in one pass over the input.
// Numerics: lightning_spec/quant/numerics.py; pure-PyTorch twin: lightning_spec/ops/reference.py.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

namespace lightning_spec {

// out = (clamp(round(x / s) + z, qmin, qmax) - z) * s per group of `group_size` inputs of each row (the whole row for
// int8 / w8a8), and inside = where the clamp did not bite. With `observe`, scale (and zero) are first set, in place,
// to the numerics' statistics of x.
std::tuple<at::Tensor, at::Tensor> fake_quantize_cpu(const at::Tensor& input, at::Tensor& scale,
                                                     const std::optional<at::Tensor>& zero, const std::string& scheme,
                                                     int64_t group_size, bool observe);

std::tuple<at::Tensor, at::Tensor> fake_quantize_cuda(const at::Tensor& input, at::Tensor& scale,
                                                      const std::optional<at::Tensor>& zero, const std::string& scheme,
                                                      int64_t group_size, bool observe);

}  // namespace lightning_spec
