"""Low-bit weights: the numerics (numerics.py), QuantizedLinear and quantize_model (linear.py)."""
from lightning_spec.quant.numerics import SCHEMES, dequantize_weight, fake_quantize_weight, quantize_weight
from lightning_spec.quant.linear import QuantizedLinear, quantize_model

__all__ = ["SCHEMES", "QuantizedLinear", "dequantize_weight", "fake_quantize_weight", "quantize_model", "quantize_weight"]
