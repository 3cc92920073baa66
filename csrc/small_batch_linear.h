// Kernel of lightning_spec::small_batch_linear (registered in ops.cpp).
#pragma once
#include <ATen/ATen.h>

#include <optional>

namespace lightning_spec {

at::Tensor small_batch_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias);

}  // namespace lightning_spec
