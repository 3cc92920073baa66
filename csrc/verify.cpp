// CPU kernel of lightning_spec::verify_tree: one batch row per OpenMP iteration, each running verify_walk.h.
#include "verify.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "verify_checks.h"
#include "verify_walk.h"

namespace lightning_spec {

// One pass per row: finite, non-negative, summing to 1 within probability_sum_tolerance (verify_checks.h). The sum
// runs in kLanes independent double accumulators so that it vectorizes and is bound by memory, not by add latency:
// the check needs a tolerance, not the walk's bit-exact sequential order.
template <typename T>
static void check_probability_rows(const T* probs, int64_t rows, int64_t V, double tolerance, const char* name) {
  constexpr int64_t kLanes = 16;
  int64_t first_bad_value = rows, first_bad_sum = rows;
#pragma omp parallel for reduction(min : first_bad_value, first_bad_sum)
  for (int64_t row = 0; row < rows; ++row) {
    const T* p = probs + row * V;
    double lanes[kLanes] = {0.0};
    bool bad = false;
    int64_t i = 0;
    for (; i + kLanes <= V; i += kLanes) {
      for (int64_t l = 0; l < kLanes; ++l) {
        const double v = static_cast<double>(p[i + l]);
        lanes[l] += v;
        bad |= !(v >= 0.0 && v <= std::numeric_limits<double>::max());  // NaN fails both comparisons
      }
    }
    for (; i < V; ++i) {
      const double v = static_cast<double>(p[i]);
      lanes[0] += v;
      bad |= !(v >= 0.0 && v <= std::numeric_limits<double>::max());
    }
    double total = 0.0;
    for (int64_t l = 0; l < kLanes; ++l) total += lanes[l];
    if (bad)
      first_bad_value = std::min(first_bad_value, row);
    else if (!(std::abs(total - 1.0) <= tolerance))
      first_bad_sum = std::min(first_bad_sum, row);
  }
  TORCH_CHECK_VALUE(first_bad_value == rows, "verify_tree: ", name, " has non-finite or negative values (flat row ",
                    first_bad_value, ")");
  TORCH_CHECK_VALUE(first_bad_sum == rows, "verify_tree: ", name, " rows must sum to 1 (within ", tolerance,
                    "); flat row ", first_bad_sum, " does not");
}

template <typename T>
static void verify_rows_cpu(const int64_t* candidates, const int64_t* parents, const T* target, const T* draft,
                            int64_t draft_rows, const double* uniforms, int64_t B, int64_t N, int64_t V, bool greedy,
                            int64_t* accepted, int64_t* num_accepted, int64_t* next_token) {
#pragma omp parallel
  {
    std::vector<double> scratch(greedy ? 0 : V);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      verify_tree_row(candidates + b * N, parents + b * N, target + b * N * V, draft ? draft + b * draft_rows * V : draft,
                      uniforms ? uniforms + b * (N + 1) : uniforms, N, V, greedy, scratch.data(), accepted + b * N,
                      num_accepted + b, next_token + b);
    }
  }
}

VerifyTreeResult verify_tree_cpu(const at::Tensor& candidates, const at::Tensor& parents,
                                 const at::Tensor& target_probs, const std::optional<at::Tensor>& draft_probs,
                                 const std::optional<at::Tensor>& uniforms, bool greedy) {
  check_verify_tree_args(candidates, parents, target_probs, draft_probs, uniforms, greedy);
  const int64_t B = target_probs.size(0), N = target_probs.size(1), V = target_probs.size(2);
  const auto cand = candidates.contiguous(), par = parents.contiguous(), target = widened(target_probs);
  const auto draft = draft_probs ? std::optional<at::Tensor>(widened(*draft_probs)) : std::nullopt;
  const auto unif = uniforms && !greedy ? std::optional<at::Tensor>(uniforms->contiguous()) : std::nullopt;
  auto accepted = at::empty({B, N}, candidates.options());
  auto num_accepted = at::empty({B}, candidates.options());
  auto next_token = at::empty({B}, candidates.options());
  AT_DISPATCH_FLOATING_TYPES(target.scalar_type(), "verify_tree_cpu", [&] {
    const double tolerance = probability_sum_tolerance(target_probs.scalar_type(), V);  // the dtype as given
    check_probability_rows(target.data_ptr<scalar_t>(), B * N, V, tolerance, "target_probs");
    if (draft)
      check_probability_rows(draft->data_ptr<scalar_t>(), draft->size(0) * draft->size(1), V, tolerance, "draft_probs");
    verify_rows_cpu<scalar_t>(cand.data_ptr<int64_t>(), par.data_ptr<int64_t>(), target.data_ptr<scalar_t>(),
                              draft ? draft->data_ptr<scalar_t>() : nullptr, draft ? draft->size(1) : 0,
                              unif ? unif->data_ptr<double>() : nullptr, B, N, V, greedy,
                              accepted.data_ptr<int64_t>(), num_accepted.data_ptr<int64_t>(),
                              next_token.data_ptr<int64_t>());
  });
  return {accepted, num_accepted, next_token};
}

}  // namespace lightning_spec
