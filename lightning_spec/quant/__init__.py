"""Low-bit weights: the numerics (numerics.py), QuantizedLinear and quantize_model (linear.py), QAT's fake-quantized
layers and convert (fake.py, on the compiled op in lightning_spec.ops.fake_quant)."""
from lightning_spec.quant.numerics import SCHEMES, dequantize_weight, quantize_weight
from lightning_spec.ops.fake_quant import fake_quantize_weight
from lightning_spec.quant.linear import QuantizedLinear, quantize_model
from lightning_spec.quant.fake import FakeQuantLinear, convert, prepare_qat

__all__ = ["SCHEMES", "FakeQuantLinear", "QuantizedLinear", "convert", "dequantize_weight", "fake_quantize_weight", "prepare_qat",
           "quantize_model", "quantize_weight"]
