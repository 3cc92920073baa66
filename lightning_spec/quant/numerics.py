"""The quantization numerics, defined once: what quantize_weight packs, what dequantize_weight and the kernels
compute, and what the QAT fake quantizer reproduces.

Schemes:
  "int8"       weight-only, symmetric, per output channel: s = max(-min(w) / 128, max(w) / 127),
               q = clamp(round(w / s), -128, 127)
  "int4"       weight-only, symmetric, per group of 32/64/128 inputs: s = max(-min(w) / 8, max(w) / 7),
               q = clamp(round(w / s), -8, 7)
  "int4_asym"  weight-only, per group with a zero point: s = (max(w) - min(w)) / 15, z = clamp(round(-min(w) / s), 0, 15),
               q = clamp(round(w / s) + z, 0, 15)
  "w8a8"       int8 weights as "int8", and activations quantized per token at run time the same way, multiplied in
               int32
min and max take in 0 (min(w) <= 0 <= max(w)), so the symmetric scales clip nothing and the largest weight lands on a
code at the end of the range. Every scale then has its low significand bits cleared (toward zero; 3 for int4, 4 for
int4_asym, 7 for the int8 codes) so that a code times it is exact in float32: dequantize_weight is the exact inverse on
the grid, and a dequantized weight quantizes back to the same codes and scales. The weight is (q - z) * s (z = 0
when symmetric). round is torch.round (half to even).

Packed layouts (laid out for streaming kernels):
  int8, w8a8       packed int8 [N, K]
  int4, int4_asym  packed uint8 [N, K / 2]: each 32-input chunk is 16 bytes, byte j holding input j in its low
                   nibble and input j + 16 in its high nibble; nibbles store q + 8 (int4) or q (int4_asym)
  scales float32 [N] (per channel) or [N, K / group_size]; zeros uint8 [N, K / group_size] or None
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

SCHEMES = ("int8", "int4", "int4_asym", "w8a8")
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 32  # quantize_weight's int4 group when none is given, as QuantizedLinear's and prepare_qat's
_TINY = 1e-12  # an all-zero channel or group gets this scale: it quantizes to 0 and comes back as 0
# bits of the largest |code| (int4_asym: |q - z| <= 15); a scale with this many low significand bits clear times any code is exact
SCALE_SPARE_BITS = {"int8": 7, "w8a8": 7, "int4": 3, "int4_asym": 4}


def check_scheme(scheme: str, group_size: Optional[int], in_features: Optional[int] = None, where: str = "") -> None:
    """Raise ValueError unless (scheme, group_size) is valid for ``in_features`` inputs."""
    at = f" ({where})" if where else ""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}{at}; choose one of {list(SCHEMES)}")
    if scheme.startswith("int4"):
        if type(group_size) is not int or group_size not in GROUP_SIZES:
            raise ValueError(f"{scheme} needs group_size in {list(GROUP_SIZES)}{at}, got {group_size!r}")
        if in_features is not None and in_features % group_size:
            raise ValueError(f"{scheme}: in_features {in_features} is not divisible by group_size {group_size}{at}")
    elif group_size is not None:
        raise ValueError(f"{scheme} is per output channel: group_size must be None{at}, got {group_size!r}")


def check_activation(scheme: str, activation: Optional[str]) -> None:
    """Activation quantization: None, or "int8" per token on top of an int4 scheme (w8a8 has it built in)."""
    if activation not in (None, "int8"):
        raise ValueError(f"activation must be None or 'int8', got {activation!r}")
    if activation and not scheme.startswith("int4"):
        hint = "w8a8 quantizes activations already" if scheme == "w8a8" else "int8 weights with int8 activations are scheme 'w8a8'"
        raise ValueError(f"activation={activation!r} goes with the int4 schemes; {hint}")


def _grouped(w: Tensor, scheme: str, group_size: Optional[int]) -> Tensor:
    """[N, groups, size] view in float32: one group per row for per-channel schemes."""
    N, K = w.shape
    size = group_size if scheme.startswith("int4") else K
    return w.float().reshape(N, K // size, size)


def qrange(scheme: str) -> Tuple[int, int]:
    """(qmin, qmax) of a scheme's integer codes."""
    return {"int8": (-128, 127), "w8a8": (-128, 127), "int4": (-8, 7), "int4_asym": (0, 15)}[scheme]


def exact_scale(scale: Tensor, scheme: str) -> Tensor:
    """``scale`` (float32) with its low significand bits cleared, toward zero, so that every code of ``scheme`` times
    it is exact in float32 (the codes need at most SCALE_SPARE_BITS bits). Infinities and NaNs pass through."""
    keep = ~((1 << SCALE_SPARE_BITS[scheme]) - 1)
    cleared = (scale.contiguous().view(torch.int32) & keep).view(torch.float32)
    return torch.where(torch.isfinite(scale), cleared, scale)


def weight_qparams(w: Tensor, scheme: str, group_size: Optional[int] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """The scales and zero points the numerics give ``w``: float32 [N, groups] each (one group per row for the
    per-channel schemes); zero points None when symmetric."""
    g = _grouped(w, scheme, group_size)
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    qmin, qmax = qrange(scheme)
    if scheme == "int4_asym":
        scale = exact_scale(((hi - lo) / 15).clamp(min=_TINY), scheme)
        return scale, torch.clamp(torch.round(-lo / scale), 0, 15)
    return exact_scale(torch.maximum(-lo / -qmin, hi / qmax).clamp(min=_TINY), scheme), None


def _codes(v: Tensor, zero: Optional[Tensor], qmin: int, qmax: int) -> Tuple[Tensor, Tensor]:
    """clamp(round(v) + z, qmin, qmax) in float32, and where the clamp did not bite."""
    code = torch.round(v)
    if zero is not None:
        code += zero
    inside = (code >= qmin) & (code <= qmax)
    return code.clamp_(qmin, qmax), inside


def _check_weight(w: Tensor, scheme: str, group_size: Optional[int]) -> None:
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"weight must be a floating-point [out_features, in_features] matrix, got {w.dtype} {list(w.shape)}")
    if w.shape[1] == 0:
        raise ValueError("weight has no input features (in_features = 0)")
    check_scheme(scheme, group_size, w.shape[1])


def _grouped_qparams(w: Tensor, scheme: str, group_size: Optional[int], scales: Tensor, zeros: Optional[Tensor]):
    """The [N, groups, size] float32 view of w, and scales and zero points broadcast to it."""
    g = _grouped(w, scheme, group_size)
    N, G, _ = g.shape
    return g, scales.float().reshape(N, G, 1), zeros.float().reshape(N, G, 1) if zeros is not None else None


def quantize_codes(w: Tensor, scheme: str, group_size: Optional[int] = None, scales: Optional[Tensor] = None,
                   zeros: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Integer codes q (int32 [N, K]), scales (float32 [N] or [N, groups]) and zero points (uint8, or None), with the
    numerics' scales for ``w`` unless ``scales`` (and ``zeros``) are given (e.g. frozen or learned during QAT)."""
    _check_weight(w, scheme, group_size)
    w = w.detach()  # codes and scales are constants: a Parameter's graph stops here
    N, K = w.shape
    G = K // group_size if scheme.startswith("int4") else 1
    if scales is None:
        scales, zeros = weight_qparams(w, scheme, group_size)
    else:
        scales, zeros = scales.detach(), zeros.detach() if zeros is not None else None
        if tuple(scales.shape) not in ((N, G), (N,) if G == 1 else (N, G)):
            raise ValueError(f"{scheme} scales must be [{N}, {G}]{f' or [{N}]' if G == 1 else ''}, got {list(scales.shape)}")
        if not bool((scales > 0).all()):
            raise ValueError("scales must be positive")
        if (zeros is not None) != (scheme == "int4_asym"):
            raise ValueError(f"zeros go with int4_asym's scales (and only with them); scheme is {scheme}")
        if zeros is not None and tuple(zeros.shape) != tuple(scales.shape):
            raise ValueError(f"zeros must have the scales' shape {list(scales.shape)}, got {list(zeros.shape)}")
    if zeros is not None:
        _check_zero_points(zeros)
    g, s, z = _grouped_qparams(w, scheme, group_size, scales, zeros)
    q, _ = _codes(g / s, z, *qrange(scheme))
    scales = s.reshape(N, G)
    scales = scales.contiguous() if scheme.startswith("int4") else scales[:, 0].contiguous()
    zeros = z.reshape(N, G).to(torch.uint8) if z is not None else None
    return q.reshape(w.shape).to(torch.int32), scales, zeros


def _pack_nibbles(u: Tensor) -> Tensor:
    """uint nibbles [N, K] (values 0..15) -> uint8 [N, K/2] in the 32-input chunk layout."""
    N, K = u.shape
    chunks = u.to(torch.uint8).reshape(N, K // 32, 2, 16)
    return (chunks[:, :, 0] | (chunks[:, :, 1] << 4)).reshape(N, K // 2)


def _unpack_nibbles(packed: Tensor) -> Tensor:
    N, half = packed.shape
    chunks = packed.reshape(N, half // 16, 1, 16)
    return torch.cat([chunks & 0x0F, chunks >> 4], dim=2).reshape(N, half * 2)


def quantize_weight(w: Tensor, scheme: str, group_size: Optional[int] = None, scales: Optional[Tensor] = None,
                    zeros: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Quantize a [N, K] weight: returns (packed, scales, zeros), zeros None when symmetric (see the layouts above).
    The int4 schemes take groups of DEFAULT_GROUP_SIZE (32) inputs when ``group_size`` is None. ``scales``/``zeros``
    as in quantize_codes. An inf or NaN in ``w``, or a range wider than float32 holds, is an error."""
    if group_size is None and scheme in ("int4", "int4_asym"):
        group_size = DEFAULT_GROUP_SIZE
    if isinstance(w, Tensor) and not bool(torch.isfinite(w).all()):
        raise ValueError("weight has inf or NaN entries: they have no quantized code")
    q, scales, zeros = quantize_codes(w, scheme, group_size, scales, zeros)
    if not bool(torch.isfinite(scales).all()):
        raise ValueError(f"weight's range overflows a float32 {scheme} scale (a group spans more than 3.4e38)")
    if scheme in ("int8", "w8a8"):
        return q.to(torch.int8).contiguous(), scales, None
    return _pack_nibbles(q + 8 if scheme == "int4" else q), scales, zeros


def _check_zero_points(zeros: Tensor) -> None:
    if zeros.numel() and not bool(((zeros >= 0) & (zeros <= 15) & (zeros == torch.round(zeros.float()))).all()):
        raise ValueError("int4_asym zeros must be integers in [0, 15]")


def packed_group_size(packed: Tensor, scales: Tensor, scheme: str, group_size: Optional[int]) -> Optional[int]:
    """``group_size``, or for int4 when it is None the group size the shapes tell: K / scales.shape[1]."""
    if group_size is not None or scheme not in ("int4", "int4_asym") or not all(
            isinstance(t, Tensor) and t.dim() == 2 for t in (packed, scales)):
        return group_size
    K, groups = 2 * packed.shape[1], scales.shape[1]
    if groups == 0 or K % groups or K // groups not in GROUP_SIZES:
        raise ValueError(f"{scheme}: scales {list(scales.shape)} do not split packed's K = {K} inputs into groups of "
                         f"{list(GROUP_SIZES)}; pass group_size")
    return K // groups


def check_packed(packed: Tensor, scales: Tensor, zeros: Optional[Tensor], scheme: str, group_size: Optional[int], in_features: Optional[int] = None) -> int:
    """Validate a packed weight for ``scheme`` and (already resolved by packed_group_size) ``group_size``; returns
    in_features (K)."""
    check_scheme(scheme, group_size)
    if packed.dim() != 2:
        raise ValueError(f"packed must be a 2-D tensor, got {list(packed.shape)}")
    N = packed.shape[0]
    if scheme in ("int8", "w8a8"):
        if packed.dtype != torch.int8:
            raise ValueError(f"{scheme} packed weights are int8 [N, K], got {packed.dtype} (packed for another scheme?)")
        K = packed.shape[1]
        want_scales = (N,)
    else:
        if packed.dtype != torch.uint8:
            raise ValueError(f"{scheme} packed weights are uint8 [N, K/2], got {packed.dtype} (packed for another scheme?)")
        K = packed.shape[1] * 2
        if K % group_size:
            raise ValueError(f"{scheme}: K = {K} from packed is not divisible by group_size {group_size}")
        want_scales = (N, K // group_size)
    if scales.dtype != torch.float32 or tuple(scales.shape) != want_scales:
        raise ValueError(f"{scheme} scales must be float32 {list(want_scales)}, got {scales.dtype} {list(scales.shape)} (another scheme or group size?)")
    if scheme == "int4_asym":
        if zeros is None or zeros.dtype != torch.uint8 or tuple(zeros.shape) != want_scales:
            raise ValueError(f"int4_asym needs zeros uint8 {list(want_scales)}, got {None if zeros is None else (zeros.dtype, list(zeros.shape))}")
    elif zeros is not None:
        raise ValueError(f"{scheme} is symmetric: zeros must be None")
    if K == 0:
        raise ValueError("packed has no input features (K = 0)")
    if in_features is not None and in_features != K:
        raise ValueError(f"x has {in_features} input features but the packed weight has K = {K}")
    for name, t in (("scales", scales), ("zeros", zeros)):
        if t is not None and t.device != packed.device:
            raise ValueError(f"{name} is on {t.device} but packed is on {packed.device}")
    return K


def dequantize_weight(packed: Tensor, scales: Tensor, zeros: Optional[Tensor], *, scheme: str, group_size: Optional[int] = None) -> Tensor:
    """The float32 [N, K] weight that packed codes stand for: (q - z) * s. For int4, ``group_size`` None reads it from
    the shapes (K / scales.shape[1])."""
    group_size = packed_group_size(packed, scales, scheme, group_size)
    check_packed(packed, scales, zeros, scheme, group_size)
    if zeros is not None:
        _check_zero_points(zeros)
    return dequantize_checked(packed, scales, zeros, scheme, group_size)


def dequantize_checked(packed: Tensor, scales: Tensor, zeros: Optional[Tensor], scheme: str, group_size: Optional[int]) -> Tensor:
    """dequantize_weight of arguments already checked (no data-dependent checks: traceable by torch.compile)."""
    N, K = packed.shape[0], packed.shape[1] * (1 if scheme in ("int8", "w8a8") else 2)
    if scheme in ("int8", "w8a8"):
        return packed.float() * scales[:, None]
    q = _unpack_nibbles(packed).float() - (8 if scheme == "int4" else 0)
    z = zeros.float()[:, :, None] if zeros is not None else 0.0
    return ((q.reshape(N, -1, group_size) - z) * scales[:, :, None]).reshape(N, K)


def quantize_activation(x: Tensor) -> Tuple[Tensor, Tensor]:
    """w8a8's dynamic per-token activation quantization, the int8 weight numerics per row: (int8 codes [M, K],
    float32 scales [M])."""
    codes, scale, _ = quantize_codes(x.float(), "int8")
    return codes.to(torch.int8), scale
