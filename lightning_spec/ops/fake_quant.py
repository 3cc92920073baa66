"""QAT's fake quantization on the compiled op lightning_spec::fake_quantize (numerics: lightning_spec.quant.numerics),
with the gradients of torchao and LSQ."""
from typing import Optional, Tuple

import torch
from torch import Tensor

from lightning_spec.ops import _extension  # noqa: F401  (registers torch.ops.lightning_spec)
from lightning_spec.quant.numerics import _check_weight, check_scheme, qrange


def check_fake_quantize_args(input, scale, zero, scheme, group_size) -> None:
    if not isinstance(input, Tensor) or input.dtype != torch.float32 or input.dim() != 2:
        raise ValueError(f"input must be a float32 [rows, K] matrix, got {getattr(input, 'dtype', type(input))} {list(getattr(input, 'shape', []))}")
    check_scheme(scheme, group_size, input.shape[1])
    groups = input.shape[1] // group_size if group_size else 1
    want = (input.shape[0], groups)
    if scale.dtype != torch.float32 or tuple(scale.shape) != want or not scale.is_contiguous() or scale.device != input.device:
        raise ValueError(f"scale must be a contiguous float32 {list(want)} on {input.device}, got {scale.dtype} {list(scale.shape)} on {scale.device}")
    if scheme == "int4_asym":
        if zero is None or zero.dtype != torch.float32 or zero.shape != scale.shape or not zero.is_contiguous() or zero.device != input.device:
            raise ValueError(f"int4_asym needs zero as a contiguous float32 {list(want)} on {input.device}")
    elif zero is not None:
        raise ValueError(f"{scheme} is symmetric: zero must be None")


def fake_quantize(input: Tensor, scale: Tensor, zero: Optional[Tensor] = None, *, scheme: str,
                  group_size: Optional[int] = None, observe: bool = False) -> Tuple[Tensor, Tensor]:
    """(out, inside) for ``input`` [rows, K] float32: out = (clamp(round(x / s) + z, qmin, qmax) - z) * s per group of
    ``group_size`` inputs of a row (the whole row for int8 / w8a8), inside = where the clamp did not bite. With
    ``observe``, ``scale`` (and ``zero``) [rows, groups] are first set in place to the numerics' statistics of input.
    No autograd here: fake_quantize_weight / fake_quantize_activation below carry the gradients.

    Example::

        scale = torch.empty(1536, 576 // 32)
        out, inside = fake_quantize(w, scale, scheme="int4", group_size=32, observe=True)
    """
    check_fake_quantize_args(input, scale, zero, scheme, group_size)
    return torch.ops.lightning_spec.fake_quantize(input, scale, zero, scheme, group_size or 0, observe)


@torch.library.register_fake("lightning_spec::fake_quantize")
def _fake_quantize_fake(input, scale, zero, scheme, group_size, observe):
    return torch.empty_like(input), torch.empty_like(input, dtype=torch.bool)


class _FakeQuantize(torch.autograd.Function):
    """The op with the gradients of torchao and LSQ: straight through the rounding to x, zero where the clamp bites;
    to the scale (when it needs one) through x / s, i.e. code - z - x / s inside the range and the clamp bound outside."""

    @staticmethod
    def forward(ctx, x, scale, zero, scheme, group_size, observe):
        out, inside = fake_quantize(x, scale, zero, scheme=scheme, group_size=group_size, observe=observe)
        ctx.save_for_backward(inside, x, scale, zero)
        ctx.scheme = scheme
        ctx.mark_non_differentiable(inside)
        return out, inside

    @staticmethod
    def backward(ctx, grad, _):
        inside, x, scale, zero = ctx.saved_tensors
        grad_x = torch.where(inside, grad, 0.0) if ctx.needs_input_grad[0] else None
        grad_scale = None
        if ctx.needs_input_grad[1]:
            rows, groups = scale.shape
            s = scale[:, :, None]
            z = zero[:, :, None] if zero is not None else 0.0
            v = x.reshape(rows, groups, -1) / s
            qmin, qmax = qrange(ctx.scheme)
            code = (torch.round(v) + z).clamp_(qmin, qmax) - z
            lsq = code - torch.where(inside.reshape(v.shape), v, 0.0)
            grad_scale = (grad.reshape(v.shape) * lsq).sum(-1)
        return grad_x, grad_scale, None, None, None, None


def fake_quantize_weight(w: Tensor, scheme: str, group_size: Optional[int] = None, scales: Optional[Tensor] = None,
                         zeros: Optional[Tensor] = None, observe: bool = False) -> Tensor:
    """(q - z) * s in float32: what dequantize_weight(quantize_weight(w)) returns, differentiable for QAT.

    With ``scales`` (and ``zeros``) [N, groups] given, computes with them; ``observe=True`` first sets them in place to
    w's statistics (a QAT layer's buffers while it observes). Without, computes with w's statistics. Gradients follow
    torchao/LSQ: straight through the rounding to ``w``, zero where the clamp bites, and to given ``scales`` through
    w / s (codes - w / s inside the range, the clamp bound outside).
    """
    _check_weight(w, scheme, group_size)
    if scales is None:
        groups = w.shape[1] // group_size if group_size else 1
        scales = w.new_empty((w.shape[0], groups), dtype=torch.float32)
        zeros = torch.empty_like(scales) if scheme == "int4_asym" else None
        observe = True
    out, _ = _FakeQuantize.apply(w.float(), scales, zeros, scheme, group_size, observe)
    return out


def fake_quantize_activation(x: Tensor) -> Tensor:
    """w8a8's per-token activation quantization of ``x`` [..., K] as codes * scale, in float32 (the scale is a statistic,
    the int8 numerics per token, not learned); gradient straight through the rounding, zero where the clamp bites."""
    x2 = x.float().reshape(-1, x.shape[-1])
    scale = x2.new_empty((x2.shape[0], 1))
    out, _ = _FakeQuantize.apply(x2, scale, None, "int8", None, True)
    return out.reshape(x.shape)
