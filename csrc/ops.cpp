// The one registration file of the lightning_spec._C extension: op schemas, device kernels, Python module.
// Importing lightning_spec._C runs the static registrations below; the module holds one binding.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>
#include <torch/python.h>  // pybind11 and its at::Tensor casters

#include "fake_quant.h"
#include "qmatmul.h"
#include "small_batch_linear.h"
#include "verify.h"

namespace {

// quantized_linear through the dispatcher below autograd, for lightning_spec.ops.quantized_linear when nothing needs
// a gradient: a decode step's call takes microseconds, and this binding parses its arguments in a fraction of the
// time torch.ops' schema-driven one takes.
at::Tensor quantized_linear_below_autograd(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                                           const std::optional<at::Tensor>& zeros, const std::string& scheme,
                                           int64_t group_size, const std::optional<at::Tensor>& bias) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lightning_spec::quantized_linear", "")
                             .typed<decltype(lightning_spec::quantized_linear_cpu)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(x, packed, scales, zeros, scheme, group_size, bias);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.def("quantized_linear_below_autograd", &quantized_linear_below_autograd,
        pybind11::call_guard<pybind11::gil_scoped_release>());
}

TORCH_LIBRARY(lightning_spec, m) {
  m.def(
      "verify_tree(Tensor candidates, Tensor parents, Tensor target_probs, Tensor? draft_probs, Tensor? uniforms, "
      "bool greedy) -> (Tensor accepted, Tensor num_accepted, Tensor next_token)");
  m.def(
      "quantized_linear(Tensor x, Tensor packed, Tensor scales, Tensor? zeros, str scheme, int group_size, "
      "Tensor? bias) -> Tensor");
  m.def(
      "fake_quantize(Tensor input, Tensor(a!) scale, Tensor(b!)? zero, str scheme, int group_size, bool observe) -> "
      "(Tensor out, Tensor inside)");
  m.def("small_batch_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("qmatmul_cpu_isa() -> str", [] { return lightning_spec::qmatmul_cpu_isa(); });
}

TORCH_LIBRARY_IMPL(lightning_spec, CPU, m) {
  m.impl("verify_tree", &lightning_spec::verify_tree_cpu);
  m.impl("quantized_linear", &lightning_spec::quantized_linear_cpu);
  m.impl("fake_quantize", &lightning_spec::fake_quantize_cpu);
  m.impl("small_batch_linear", &lightning_spec::small_batch_linear_cpu);
}

#ifdef LIGHTNING_SPEC_WITH_CUDA
TORCH_LIBRARY_IMPL(lightning_spec, CUDA, m) {
  m.impl("verify_tree", &lightning_spec::verify_tree_cuda);
  m.impl("quantized_linear", &lightning_spec::quantized_linear_cuda);
  m.impl("fake_quantize", &lightning_spec::fake_quantize_cuda);
}
#endif
