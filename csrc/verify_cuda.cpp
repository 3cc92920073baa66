// ATen side of the CUDA kernel (compiled only in CUDA builds): checks, layout, scratch, launch on the current stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include "verify.h"
#include "verify_checks.h"

namespace lightning_spec {

template <typename T>
cudaError_t launch_verify_tree(const int64_t* candidates, const int64_t* parents, const T* target, const T* draft,
                               int64_t draft_rows, const double* uniforms, int64_t B, int64_t N, int64_t V,
                               bool greedy, double* scratch, int64_t* accepted, int64_t* num_accepted,
                               int64_t* next_token, cudaStream_t stream);

VerifyTreeResult verify_tree_cuda(const at::Tensor& candidates, const at::Tensor& parents,
                                  const at::Tensor& target_probs, const std::optional<at::Tensor>& draft_probs,
                                  const std::optional<at::Tensor>& uniforms, bool greedy) {
  check_verify_tree_args(candidates, parents, target_probs, draft_probs, uniforms, greedy);
  check_probabilities(target_probs, "target_probs");
  if (draft_probs) check_probabilities(*draft_probs, "draft_probs");
  const c10::cuda::CUDAGuard device_guard(target_probs.device());
  const int64_t B = target_probs.size(0), N = target_probs.size(1), V = target_probs.size(2);
  const auto cand = candidates.contiguous(), par = parents.contiguous(), target = widened(target_probs);
  const auto draft = draft_probs ? std::optional<at::Tensor>(widened(*draft_probs)) : std::nullopt;
  const auto unif = uniforms && !greedy ? std::optional<at::Tensor>(uniforms->contiguous()) : std::nullopt;
  auto scratch = at::empty({greedy ? 0 : B * V}, target_probs.options().dtype(at::kDouble));
  auto accepted = at::empty({B, N}, candidates.options());
  auto num_accepted = at::empty({B}, candidates.options());
  auto next_token = at::empty({B}, candidates.options());
  AT_DISPATCH_FLOATING_TYPES(target.scalar_type(), "verify_tree_cuda", [&] {
    const auto status = launch_verify_tree<scalar_t>(
        cand.data_ptr<int64_t>(), par.data_ptr<int64_t>(), target.data_ptr<scalar_t>(),
        draft ? draft->data_ptr<scalar_t>() : nullptr, draft ? draft->size(1) : 0,
        unif ? unif->data_ptr<double>() : nullptr, B, N, V, greedy, greedy ? nullptr : scratch.data_ptr<double>(),
        accepted.data_ptr<int64_t>(), num_accepted.data_ptr<int64_t>(), next_token.data_ptr<int64_t>(),
        c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(status == cudaSuccess, "verify_tree: CUDA launch failed: ", cudaGetErrorString(status));
  });
  return {accepted, num_accepted, next_token};
}

}  // namespace lightning_spec
