// The one registration file of the lightning_spec._C extension: op schemas, device kernels, Python module.
#include <Python.h>
#include <torch/library.h>

#include "fake_quant.h"
#include "qmatmul.h"
#include "small_batch_linear.h"
#include "verify.h"

// Importing lightning_spec._C runs the static registrations below; the module itself is empty.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
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
