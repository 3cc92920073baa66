// Device kernels of lightning_spec::verify_tree (registered in ops.cpp).
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace lightning_spec {

using VerifyTreeResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;  // accepted, num_accepted, next_token

VerifyTreeResult verify_tree_cpu(const at::Tensor& candidates, const at::Tensor& parents,
                                 const at::Tensor& target_probs, const std::optional<at::Tensor>& draft_probs,
                                 const std::optional<at::Tensor>& uniforms, bool greedy);

VerifyTreeResult verify_tree_cuda(const at::Tensor& candidates, const at::Tensor& parents,
                                  const at::Tensor& target_probs, const std::optional<at::Tensor>& draft_probs,
                                  const std::optional<at::Tensor>& uniforms, bool greedy);

// Half-precision inputs are widened to float32 (exact), so the kernels only see float32 and float64.
inline at::Tensor widened(const at::Tensor& probs) {
  const auto dtype = probs.scalar_type();
  return (dtype == at::kBFloat16 || dtype == at::kHalf ? probs.to(at::kFloat) : probs).contiguous();
}

}  // namespace lightning_spec
