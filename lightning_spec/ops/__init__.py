"""Compiled ops (csrc/, loaded from lightning_spec._C); pure-PyTorch twins in lightning_spec.ops.reference."""
from lightning_spec.ops._extension import active_implementation, extension_path
from lightning_spec.ops.fake_quant import fake_quantize
from lightning_spec.ops.qmatmul import quantized_linear
from lightning_spec.ops.small_batch import small_batch_linear
from lightning_spec.ops.verify import verify_chain, verify_tree

__all__ = ["active_implementation", "extension_path", "fake_quantize", "quantized_linear", "small_batch_linear", "verify_chain", "verify_tree"]
