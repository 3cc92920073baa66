// ATen side of the quantized_linear CUDA kernels (compiled only in CUDA builds): checks, activation codes for
// w8a8, the streaming kernel for M <= 16 rows, dequantize + cuBLAS above.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "qmatmul.h"
#include "qmatmul_checks.h"

namespace lightning_spec {

cudaError_t launch_quantized_linear_stream(int scheme, const float* x, const int8_t* xq, const float* xs,
                                           const void* packed, const float* scales, const uint8_t* zeros, float* y,
                                           int64_t M, int64_t N, int64_t K, int64_t group, cudaStream_t stream);
cudaError_t launch_dequantize(int scheme, const void* packed, const float* scales, const uint8_t* zeros, float* w,
                              int64_t N, int64_t K, int64_t group, cudaStream_t stream);

// The streaming kernels read 16 bytes per load: a view starting off a 16-byte boundary is copied.
static at::Tensor aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 ? t : t.clone();
}

at::Tensor quantized_linear_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                                 const std::optional<at::Tensor>& zeros, const std::string& scheme_name,
                                 int64_t group_size, const std::optional<at::Tensor>& bias) {
  Scheme scheme;
  int64_t N, K;
  std::tie(scheme, N, K) = check_quantized_linear_args(x, packed, scales, zeros, scheme_name, group_size, bias);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const bool grouped = scheme == Scheme::kInt4 || scheme == Scheme::kInt4Asym;
  const int64_t group = grouped ? group_size : K;
  const auto x2 = aligned16(x.reshape({-1, K}).to(at::kFloat).contiguous());
  const int64_t M = x2.size(0);
  const auto w = aligned16(packed.contiguous()), s = scales.contiguous();
  const auto z = zeros ? zeros->contiguous() : at::Tensor();
  const uint8_t* zp = z.defined() ? z.data_ptr<uint8_t>() : nullptr;

  at::Tensor xq, xs, codes;
  if (scheme == Scheme::kW8A8) {
    std::tie(codes, xs) = quantize_activation_per_token(x2);
    xq = codes.to(at::kChar).contiguous();
  }
  at::Tensor y;
  if (M <= 16) {
    y = at::empty({M, N}, x2.options());
    const auto status = launch_quantized_linear_stream(
        static_cast<int>(scheme), x2.data_ptr<float>(), xq.defined() ? xq.data_ptr<int8_t>() : nullptr,
        xs.defined() ? xs.data_ptr<float>() : nullptr, w.data_ptr(), s.data_ptr<float>(), zp, y.data_ptr<float>(), M, N,
        K, group, stream);
    TORCH_CHECK(status == cudaSuccess, "quantized_linear: CUDA launch failed: ", cudaGetErrorString(status));
  } else {
    auto weight = at::empty({N, K}, x2.options());
    const auto status = launch_dequantize(static_cast<int>(scheme), w.data_ptr(), s.data_ptr<float>(), zp,
                                          weight.data_ptr<float>(), N, K, group, stream);
    TORCH_CHECK(status == cudaSuccess, "quantized_linear: CUDA launch failed: ", cudaGetErrorString(status));
    y = at::linear(scheme == Scheme::kW8A8 ? codes * xs.unsqueeze(1) : x2, weight);
  }
  if (bias) y = y + bias->to(at::kFloat);
  auto out_shape = x.sizes().vec();
  out_shape.back() = N;
  return y.to(x.scalar_type()).reshape(out_shape);
}

}  // namespace lightning_spec
