// Host-side pieces of lightning_spec::quantized_linear shared by the CPU and CUDA kernels: the argument checks (each
// a ValueError naming the argument, so that the Python wrapper, lightning_spec/ops/qmatmul.py, adds no per-call
// checks of its own; its fake implementation checks the same under torch.compile) and w8a8's activation
// quantization.
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace lightning_spec {

enum class Scheme { kInt8 = 0, kInt4 = 1, kInt4Asym = 2, kW8A8 = 3 };

// Also fake_quantize's (fake_quant_checks.h): ``op`` names the caller in the error.
inline Scheme parse_scheme(const std::string& scheme, const char* op = "quantized_linear") {
  if (scheme == "int8") return Scheme::kInt8;
  if (scheme == "int4") return Scheme::kInt4;
  if (scheme == "int4_asym") return Scheme::kInt4Asym;
  if (scheme == "w8a8") return Scheme::kW8A8;
  TORCH_CHECK_VALUE(false, op, ": unknown scheme '", scheme, "' (int8, int4, int4_asym, w8a8)");
}

// Returns (scheme, N, K).
inline std::tuple<Scheme, int64_t, int64_t> check_quantized_linear_args(
    const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
    const std::string& scheme_name, int64_t group_size, const std::optional<at::Tensor>& bias) {
  const Scheme scheme = parse_scheme(scheme_name);
  const bool grouped = scheme == Scheme::kInt4 || scheme == Scheme::kInt4Asym;
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
                    "quantized_linear: x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() >= 1, "quantized_linear: x must have at least one dimension");
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"packed", &packed}, {"scales", &scales}})
    TORCH_CHECK_VALUE(t->device() == x.device(), "quantized_linear: ", name, " is on ", t->device(), " but x is on ",
                      x.device());
  TORCH_CHECK_VALUE(packed.dim() == 2, "quantized_linear: packed must be 2-D, got ", packed.sizes());
  TORCH_CHECK_VALUE(packed.scalar_type() == (grouped ? at::kByte : at::kChar), "quantized_linear: ", scheme_name,
                    " packed weights must be ", grouped ? "uint8 [N, K/2]" : "int8 [N, K]", ", got ",
                    packed.scalar_type(), " (packed for another scheme?)");
  const int64_t N = packed.size(0);
  const int64_t K = grouped ? packed.size(1) * 2 : packed.size(1);
  TORCH_CHECK_VALUE(x.size(-1) == K, "quantized_linear: x has ", x.size(-1),
                    " input features, the packed weight has K = ", K);
  TORCH_CHECK_VALUE(K > 0, "quantized_linear: packed has no input features (K = 0)");
  // |code products| <= 128 * 128 = 2^14: K of them fit w8a8's int32 accumulators while K * 2^14 < 2^31
  TORCH_CHECK_VALUE(scheme != Scheme::kW8A8 || K < (int64_t{1} << 17), "quantized_linear: w8a8 accumulates in int32, ",
                    "so K must be at most 131071, got ", K);
  if (grouped) {
    TORCH_CHECK_VALUE(group_size == 32 || group_size == 64 || group_size == 128,
                      "quantized_linear: group_size must be 32, 64 or 128 for ", scheme_name, ", got ",
                      group_size ? std::to_string(group_size) : "None");
    TORCH_CHECK_VALUE(K % group_size == 0, "quantized_linear: K = ", K, " is not divisible by group_size ", group_size);
  } else {
    TORCH_CHECK_VALUE(group_size == 0, "quantized_linear: ", scheme_name, " is per channel; group_size must be None");
  }
  const std::vector<int64_t> scale_shape = grouped ? std::vector<int64_t>{N, K / group_size} : std::vector<int64_t>{N};
  TORCH_CHECK_VALUE(scales.scalar_type() == at::kFloat && scales.sizes() == at::IntArrayRef(scale_shape),
                    "quantized_linear: scales must be float32 ", at::IntArrayRef(scale_shape), ", got ",
                    scales.scalar_type(), " ", scales.sizes());
  if (scheme == Scheme::kInt4Asym) {
    TORCH_CHECK_VALUE(zeros.has_value() && zeros->scalar_type() == at::kByte &&
                          zeros->sizes() == at::IntArrayRef(scale_shape) && zeros->device() == x.device(),
                      "quantized_linear: int4_asym needs zeros uint8 ", at::IntArrayRef(scale_shape), " on x's device");
  } else {
    TORCH_CHECK_VALUE(!zeros.has_value(), "quantized_linear: ", scheme_name, " is symmetric; zeros must be None");
  }
  if (bias) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N && bias->device() == x.device() && bias->is_floating_point(),
                      "quantized_linear: bias must be a floating-point [", N, "] on x's device, got ", bias->scalar_type(),
                      " ", bias->sizes());
  }
  return {scheme, N, K};
}

constexpr float kTinyScale = 1e-12f;  // numerics._TINY: an all-zero group quantizes to 0 and comes back as 0
constexpr int kInt8SpareBits = 7;  // numerics.SCALE_SPARE_BITS

// numerics.exact_scale: the low ``spare_bits`` significand bits cleared, so that any code times the scale is exact.
inline float exact_scale(float s, int spare_bits) {
  if (!std::isfinite(s)) return s;
  uint32_t bits;
  std::memcpy(&bits, &s, sizeof bits);
  bits &= ~((uint32_t{1} << spare_bits) - 1);
  std::memcpy(&s, &bits, sizeof bits);
  return s;
}

// w8a8's dynamic per-token activation quantization (lightning_spec.quant.numerics.quantize_activation, the int8
// weight numerics per row): returns (codes as float [M, K], scales [M]).
inline std::pair<at::Tensor, at::Tensor> quantize_activation_per_token(const at::Tensor& x2) {
  const auto [lo, hi] = x2.aminmax(1);  // min clamped to <= 0, max to >= 0, as numerics.weight_qparams
  const auto raw = at::maximum(-lo.clamp_max(0.f) / 128.f, hi.clamp_min(0.f) / 127.f).clamp_min(kTinyScale);
  const auto cleared = (raw.view(at::kInt) & ~((1 << kInt8SpareBits) - 1)).view(at::kFloat);
  const auto scales = at::where(raw.isfinite(), cleared, raw);
  return {at::clamp(at::round(x2 / scales.unsqueeze(1)), -128, 127), scales};
}

}  // namespace lightning_spec
