// ATen side of the fake_quantize CUDA kernel (compiled only in CUDA builds): checks, layout, launch on the current stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include "fake_quant.h"
#include "fake_quant_checks.h"

namespace lightning_spec {

cudaError_t launch_fake_quantize(const float* x, float* out, bool* inside, float* scale, float* zero, int64_t num_groups,
                                 int64_t group, float qmin, float qmax, int spare_bits, bool asym, bool observe,
                                 cudaStream_t stream);

std::tuple<at::Tensor, at::Tensor> fake_quantize_cuda(const at::Tensor& input, at::Tensor& scale,
                                                      const std::optional<at::Tensor>& zero, const std::string& scheme,
                                                      int64_t group_size, bool observe) {
  const FakeQuantParams p = check_fake_quantize_args(input, scale, zero, scheme, group_size);
  const c10::cuda::CUDAGuard device_guard(input.device());
  const auto x = input.contiguous();
  auto out = at::empty_like(x);
  auto inside = at::empty(x.sizes(), x.options().dtype(at::kBool));
  const auto status = launch_fake_quantize(
      x.data_ptr<float>(), out.data_ptr<float>(), inside.data_ptr<bool>(), scale.data_ptr<float>(),
      p.asym ? zero->data_ptr<float>() : nullptr, p.rows * p.groups, p.group, p.qmin, p.qmax, p.spare_bits, p.asym,
      observe, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(status == cudaSuccess, "fake_quantize: CUDA launch failed: ", cudaGetErrorString(status));
  return {out, inside};
}

}  // namespace lightning_spec
