// Argument checks of lightning_spec::verify_tree, shared by the CPU and CUDA kernels: metadata first, then the
// tree, tokens and uniforms (small: loops on the CPU, ATen reductions on CUDA). Probability rows:
// check_probabilities (ATen, any device) on CUDA; the CPU kernel has a fused one-pass loop, ~10x faster than these
// reductions. Each message names the argument.
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <optional>

namespace lightning_spec {

// How far a row of ``dtype`` probabilities over V tokens may sum from 1: 1e-3, plus the dtype's rounding of each
// probability (2 eps over the row) and half its smallest subnormal per token (a float16 softmax over a large vocabulary
// flushes its tail). The walk renormalizes by the row's sum, so the check only has to catch rows that are not
// probabilities (logits, unnormalized scores, a wrong axis).
inline double probability_sum_tolerance(at::ScalarType dtype, int64_t V) {
  int mantissa_bits = 23, min_exponent = -126;  // float32
  if (dtype == at::kDouble) mantissa_bits = 52, min_exponent = -1022;
  if (dtype == at::kBFloat16) mantissa_bits = 7;
  if (dtype == at::kHalf) mantissa_bits = 10, min_exponent = -14;
  const double eps = std::ldexp(1.0, -mantissa_bits);
  return 1e-3 + 2 * eps + static_cast<double>(V) * std::ldexp(eps, min_exponent - 1);
}

inline void check_probabilities(const at::Tensor& probs, const char* name) {
  TORCH_CHECK_VALUE((at::isfinite(probs) & (probs >= 0)).all().item<bool>(), "verify_tree: ", name,
                    " has non-finite or negative values");
  const auto row_sums = probs.sum(at::IntArrayRef{-1}, /*keepdim=*/false, at::kDouble);
  const double tolerance = probability_sum_tolerance(probs.scalar_type(), probs.size(-1));
  TORCH_CHECK_VALUE(((row_sums - 1.0).abs() <= tolerance).all().item<bool>(), "verify_tree: ", name,
                    " rows must sum to 1 (within ", tolerance, ")");
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& target_probs, const char* name) {
  TORCH_CHECK_VALUE(t.device() == target_probs.device(), "verify_tree: ", name, " is on ", t.device(),
                    " but target_probs is on ", target_probs.device());
}

constexpr const char* kRootMessage = "verify_tree: parents[:, 0] must be -1 (the root)";
constexpr const char* kParentsMessage = "verify_tree: parents must satisfy 0 <= parents[b, i] < i for i >= 1";
constexpr const char* kCandidatesMessage = "verify_tree: candidates (verify_chain's draft_tokens) must lie in [0, ";
constexpr const char* kUniformsMessage = "verify_tree: uniforms must lie in [0, 1)";

// The value checks on the CPU: loops over the few int64 and float64 entries, where the ATen reductions below (for
// CUDA) cost ~40 us a call, as much as a small tree's whole verification.
inline void check_values_cpu(const at::Tensor& candidates, const at::Tensor& parents,
                             const std::optional<at::Tensor>& uniforms, int64_t V) {
  const auto par = parents.contiguous(), cand = candidates.contiguous();
  const int64_t B = par.size(0), N = par.size(1);
  const int64_t *p = par.data_ptr<int64_t>(), *c = cand.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(p[b * N] == -1, kRootMessage);
    for (int64_t i = 1; i < N; ++i) TORCH_CHECK_VALUE(p[b * N + i] >= 0 && p[b * N + i] < i, kParentsMessage);
  }
  for (int64_t i = 0; i < B * N; ++i) TORCH_CHECK_VALUE(c[i] >= 0 && c[i] < V, kCandidatesMessage, V, ")");
  if (uniforms) {
    const auto u = uniforms->contiguous();
    const double* d = u.data_ptr<double>();
    for (int64_t i = 0; i < u.numel(); ++i) TORCH_CHECK_VALUE(d[i] >= 0 && d[i] < 1, kUniformsMessage);  // NaN fails
  }
}

inline void check_verify_tree_args(const at::Tensor& candidates, const at::Tensor& parents,
                                   const at::Tensor& target_probs, const std::optional<at::Tensor>& draft_probs,
                                   const std::optional<at::Tensor>& uniforms, bool greedy) {
  const auto probs_dtype = target_probs.scalar_type();
  TORCH_CHECK_VALUE(probs_dtype == at::kFloat || probs_dtype == at::kDouble || probs_dtype == at::kBFloat16 ||
                        probs_dtype == at::kHalf,
                    "verify_tree: target_probs must be float32, float64, bfloat16 or float16, got ", probs_dtype);
  TORCH_CHECK_VALUE(target_probs.dim() == 3, "verify_tree: target_probs must be [B, N, V], got ", target_probs.sizes());
  const int64_t B = target_probs.size(0), N = target_probs.size(1), V = target_probs.size(2);
  TORCH_CHECK_VALUE(N >= 1 && V >= 1, "verify_tree: target_probs must have N >= 1 nodes and V >= 1 tokens");
  TORCH_CHECK_VALUE(candidates.scalar_type() == at::kLong, "verify_tree: candidates must be int64, got ",
                    candidates.scalar_type());
  TORCH_CHECK_VALUE(candidates.dim() == 2 && candidates.size(0) == B && candidates.size(1) == N,
                    "verify_tree: candidates must be [B, N] = [", B, ", ", N, "], got ", candidates.sizes());
  TORCH_CHECK_VALUE(parents.scalar_type() == at::kLong, "verify_tree: parents must be int64, got ",
                    parents.scalar_type());
  TORCH_CHECK_VALUE(parents.sizes() == candidates.sizes(), "verify_tree: parents must be [B, N] = [", B, ", ", N,
                    "], got ", parents.sizes());
  check_same_device(candidates, target_probs, "candidates");
  check_same_device(parents, target_probs, "parents");
  if (draft_probs) {
    const auto& draft = *draft_probs;
    TORCH_CHECK_VALUE(draft.scalar_type() == probs_dtype, "verify_tree: draft_probs must have target_probs' dtype ",
                      probs_dtype, ", got ", draft.scalar_type());
    TORCH_CHECK_VALUE(draft.dim() == 3 && draft.size(0) == B && (draft.size(1) == N || draft.size(1) == N - 1) &&
                          draft.size(2) == V,
                      "verify_tree: draft_probs must be [B, N, V] or [B, N - 1, V] with target_probs' B, N, V = ",
                      B, ", ", N, ", ", V, ", got ", draft.sizes());
    check_same_device(draft, target_probs, "draft_probs");
  }
  TORCH_CHECK_VALUE(greedy || uniforms, "verify_tree: uniforms are required unless greedy");
  if (uniforms) {
    TORCH_CHECK_VALUE(uniforms->scalar_type() == at::kDouble, "verify_tree: uniforms must be float64, got ",
                      uniforms->scalar_type());
    TORCH_CHECK_VALUE(uniforms->dim() == 2 && uniforms->size(0) == B && uniforms->size(1) == N + 1,
                      "verify_tree: uniforms must be [B, N + 1] = [", B, ", ", N + 1, "], got ", uniforms->sizes());
    check_same_device(*uniforms, target_probs, "uniforms");
  }

  // Values: the tree is topological, tokens exist, uniforms lie in [0, 1).
  if (target_probs.is_cpu()) return check_values_cpu(candidates, parents, uniforms, V);
  TORCH_CHECK_VALUE((parents.select(1, 0) == -1).all().item<bool>(), kRootMessage);
  const auto node_index = at::arange(1, N, parents.options());
  const auto later_parents = parents.slice(1, 1);
  TORCH_CHECK_VALUE(((later_parents >= 0) & (later_parents < node_index)).all().item<bool>(), kParentsMessage);
  TORCH_CHECK_VALUE(((candidates >= 0) & (candidates < V)).all().item<bool>(), kCandidatesMessage, V, ")");
  if (uniforms) TORCH_CHECK_VALUE(((*uniforms >= 0) & (*uniforms < 1)).all().item<bool>(), kUniformsMessage);
}

}  // namespace lightning_spec
