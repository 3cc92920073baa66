// Host-side pieces of lightning_spec::fake_quantize shared by the CPU and CUDA kernels: argument checks (each message
// names the argument) and the per-scheme constants of lightning_spec/quant/numerics.py.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <string>

#include "qmatmul_checks.h"

namespace lightning_spec {

struct FakeQuantParams {
  int64_t rows, groups, group;  // the input is [rows, groups * group]
  float qmin, qmax;
  int spare_bits;  // numerics.SCALE_SPARE_BITS
  bool asym;
};

inline FakeQuantParams check_fake_quantize_args(const at::Tensor& input, const at::Tensor& scale,
                                                const std::optional<at::Tensor>& zero, const std::string& scheme,
                                                int64_t group_size) {
  const Scheme kind = parse_scheme(scheme, "fake_quantize");
  const bool grouped = kind == Scheme::kInt4 || kind == Scheme::kInt4Asym;
  TORCH_CHECK(input.scalar_type() == at::kFloat && input.dim() == 2,
              "fake_quantize: input must be a float32 [rows, K] matrix, got ", input.scalar_type(), " ", input.sizes());
  const int64_t rows = input.size(0), K = input.size(1);
  if (grouped) {
    TORCH_CHECK(group_size == 32 || group_size == 64 || group_size == 128,
                "fake_quantize: group_size must be 32, 64 or 128 for ", scheme, ", got ", group_size);
    TORCH_CHECK(K % group_size == 0, "fake_quantize: K = ", K, " is not divisible by group_size ", group_size);
  } else {
    TORCH_CHECK(group_size == 0, "fake_quantize: ", scheme, " is per row; group_size must be 0, got ", group_size);
    TORCH_CHECK(K > 0, "fake_quantize: input has no columns");
  }
  const int64_t group = grouped ? group_size : K;
  const int64_t groups = K / group;
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 2 && scale.size(0) == rows && scale.size(1) == groups,
              "fake_quantize: scale must be float32 [", rows, ", ", groups, "], got ", scale.scalar_type(), " ", scale.sizes());
  TORCH_CHECK(scale.is_contiguous(), "fake_quantize: scale must be contiguous (it is written in place when observing)");
  TORCH_CHECK(scale.device() == input.device(), "fake_quantize: scale is on ", scale.device(), ", input on ", input.device());
  const bool asym = kind == Scheme::kInt4Asym;
  if (asym) {
    TORCH_CHECK(zero.has_value() && zero->scalar_type() == at::kFloat && zero->sizes() == scale.sizes() &&
                    zero->is_contiguous() && zero->device() == input.device(),
                "fake_quantize: int4_asym needs zero as a contiguous float32 [", rows, ", ", groups, "] on ", input.device());
  } else {
    TORCH_CHECK(!zero.has_value(), "fake_quantize: ", scheme, " is symmetric; zero must be None");
  }
  if (asym) return {rows, groups, group, 0.f, 15.f, 4, true};
  if (grouped) return {rows, groups, group, -8.f, 7.f, 3, false};
  return {rows, groups, group, -128.f, 127.f, kInt8SpareBits, false};
}

}  // namespace lightning_spec
