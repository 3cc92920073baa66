"""quantized_linear on the compiled op lightning_spec::quantized_linear (numerics: lightning_spec.quant.numerics)."""
from typing import Optional

import torch
from torch import Tensor

from lightning_spec.ops._extension import _C  # registers torch.ops.lightning_spec
from lightning_spec.quant.numerics import check_packed, dequantize_checked, packed_group_size


def check_quantized_linear_args(x, packed, scales, zeros, scheme, group_size, bias) -> None:
    """The compiled op's checks (csrc/qmatmul_checks.h), for its fake implementation and the reference."""
    if not isinstance(x, Tensor) or x.dtype not in (torch.float32, torch.bfloat16) or x.dim() < 1:
        raise ValueError(f"x must be a float32 or bfloat16 tensor [..., K], got {getattr(x, 'dtype', type(x))}")
    if packed.device != x.device:
        raise ValueError(f"packed is on {packed.device} but x is on {x.device}")
    N = packed.shape[0]
    K = check_packed(packed, scales, zeros, scheme, group_size, in_features=x.shape[-1])
    if scheme == "w8a8" and K >= 2**17:  # |code products| <= 2^14: K of them fit int32 accumulators while K < 2^17
        raise ValueError(f"w8a8 accumulates in int32, so K must be at most 131071, got {K}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != N or bias.device != x.device or not bias.is_floating_point()):
        raise ValueError(f"bias must be a floating-point [{N}] on {x.device}, got {bias.dtype} {list(bias.shape)} on {bias.device}")


def quantized_linear(x: Tensor, packed: Tensor, scales: Tensor, zeros: Optional[Tensor] = None, *, scheme: str,
                     group_size: Optional[int] = None, bias: Optional[Tensor] = None) -> Tensor:
    """y = x @ dequantize_weight(packed, scales, zeros)^T (+ bias), with x [..., K] float32 or bfloat16 -> [..., N].

    "w8a8" also quantizes x per token (int8 codes, int32 accumulation). Compiled kernels stream the packed
    weight for small batches (decode, verification) and dequantize once for large ones. On AVX-512 VNNI, int4 with
    one or two rows reads x in 22-bit block fixed point (each input within 2^-22 of its 32-input chunk's largest
    |x|, about float32's own rounding unless an outlier dwarfs the rest of its chunk), to multiply nibbles with VNNI's
    exact int8 dot products. On AMX, int8 at 1-4 rows multiplies its codes by x in fixed point with int8 tile
    multiplies (each row rounded to multiples of 2^-30 of its largest |x|, exact integer sums); int8 from 5 rows and
    int4 from 6 (up to 16) take tile multiplies whose products are exact (integer codes, x in three bf16 parts that
    sum to it), and w8a8 from 3 int8 tile multiplies. For int4, ``group_size`` None reads it from the shapes
    (K / scales.shape[1]).

    Differentiable in ``x`` (grad @ the dequantized weight; straight through w8a8's activation rounding) and ``bias``,
    e.g. for adapters trained over a frozen quantized model; the packed weight and its scales are constants.

    Example::

        packed, scales, zeros = quantize_weight(linear.weight, "int4", group_size=32)
        y = quantized_linear(x, packed, scales, zeros, scheme="int4", group_size=32, bias=linear.bias)
    """
    group_size = packed_group_size(packed, scales, scheme, group_size)
    if torch.compiler.is_compiling() or torch.is_grad_enabled() and (
            x.requires_grad or scales.requires_grad or bias is not None and bias.requires_grad):
        return torch.ops.lightning_spec.quantized_linear(x, packed, scales, zeros, scheme, group_size or 0, bias)
    # Nothing to differentiate: the same op through the dispatcher below autograd, by a direct binding. torch.ops'
    # call and the Python autograd kernel that register_autograd installs cost ~4 us together; a decode step's whole
    # layer can take 10.
    return _C.quantized_linear_below_autograd(x, packed, scales, zeros, scheme, group_size or 0, bias)


@torch.library.register_fake("lightning_spec::quantized_linear")
def _quantized_linear_fake(x, packed, scales, zeros, scheme, group_size, bias):
    check_quantized_linear_args(x, packed, scales, zeros, scheme, group_size or None, bias)
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


def _setup_backward(ctx, inputs, output):
    x, packed, scales, zeros, scheme, group_size, bias = inputs
    ctx.save_for_backward(packed, scales, zeros)
    ctx.scheme, ctx.group_size, ctx.x_dtype = scheme, group_size or None, x.dtype
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward(ctx, grad):
    if ctx.needs_input_grad[2]:
        raise RuntimeError("quantized_linear has no gradient for scales: learn them in QAT (FakeQuantLinear, learn_scales=True)")
    packed, scales, zeros = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        weight = dequantize_checked(packed, scales, zeros, ctx.scheme, ctx.group_size)  # checked by the forward
        grad_x = (grad.float() @ weight).to(ctx.x_dtype)
    if ctx.needs_input_grad[6]:
        grad_bias = grad.float().reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, None, None, None, grad_bias


torch.library.register_autograd("lightning_spec::quantized_linear", _backward, setup_context=_setup_backward)
