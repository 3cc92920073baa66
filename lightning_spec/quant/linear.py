"""QuantizedLinear (an nn.Linear on packed low-bit weights, run by the compiled kernels) and quantize_model."""
import fnmatch
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

import lightning_spec.ops.qmatmul as qmatmul
from lightning_spec.quant.numerics import check_scheme, dequantize_weight, quantize_weight


class QuantizedLinear(nn.Module):
    """A linear layer whose weight is stored packed (``packed``, ``scales``, ``zeros`` buffers, so state_dict
    saves and reloads the packed form) and multiplied by lightning_spec.ops.quantized_linear.

    Example::

        layer = QuantizedLinear.from_float(nn.Linear(576, 1536), scheme="int4", group_size=32)
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, scheme: str = "int4",
                 group_size: Optional[int] = 32, device=None):
        super().__init__()
        group_size = group_size if scheme.startswith("int4") else None
        check_scheme(scheme, group_size, in_features)
        self.in_features, self.out_features, self.scheme, self.group_size = in_features, out_features, scheme, group_size
        grouped = scheme.startswith("int4")
        packed_shape = (out_features, in_features // 2) if grouped else (out_features, in_features)
        scale_shape = (out_features, in_features // group_size) if grouped else (out_features,)
        self.register_buffer("packed", torch.zeros(packed_shape, dtype=torch.uint8 if grouped else torch.int8, device=device))
        self.register_buffer("scales", torch.ones(scale_shape, dtype=torch.float32, device=device))
        self.register_buffer("zeros", torch.zeros(scale_shape, dtype=torch.uint8, device=device) if scheme == "int4_asym" else None)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_float(cls, linear: nn.Linear, scheme: str = "int4", group_size: Optional[int] = 32) -> "QuantizedLinear":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, scheme=scheme, group_size=group_size,
                    device=linear.weight.device)
        packed, scales, zeros = quantize_weight(linear.weight.detach(), scheme, layer.group_size)
        layer.packed.copy_(packed)
        layer.scales.copy_(scales)
        if zeros is not None:
            layer.zeros.copy_(zeros)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach().float())
        return layer

    def dequantized_weight(self) -> Tensor:
        return dequantize_weight(self.packed, self.scales, self.zeros, scheme=self.scheme, group_size=self.group_size)

    def forward(self, x: Tensor) -> Tensor:
        out_dtype = x.dtype
        if x.dtype not in (torch.float32, torch.bfloat16):
            x = x.float()
        y = qmatmul.quantized_linear(x, self.packed, self.scales, self.zeros, scheme=self.scheme, group_size=self.group_size, bias=self.bias)
        return y.to(out_dtype)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}{group}, bias={self.bias is not None}"


def _matches(name: str, patterns: Optional[Sequence[str]]) -> bool:
    """A pattern matches a module name by glob or as a dotted component (``"lm_head"``, ``"mlp"``, ``"*.q_proj"``)."""
    return bool(patterns) and any(fnmatch.fnmatch(name, p) or p in name.split(".") for p in patterns)


def select_linears(model: nn.Module, include: Optional[Sequence[str]], exclude: Sequence[str]) -> List[str]:
    """Names of the nn.Linear modules that ``include`` (None: all) and not ``exclude`` select; errors for patterns that
    match no linear layer."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for label, patterns in (("include", include), ("exclude", exclude)):
        for p in patterns or ():
            if not any(_matches(n, [p]) for n in names):
                raise ValueError(f"{label} pattern {p!r} matches no nn.Linear in the model (it has e.g. {names[:3]})")
    return [n for n in names if (include is None or _matches(n, include)) and not _matches(n, exclude)]


def quantize_model(model: nn.Module, scheme: str = "int4", group_size: Optional[int] = 32,
                   include: Optional[Sequence[str]] = None, exclude: Sequence[str] = ("lm_head",)) -> Dict[str, object]:
    """Swap every selected nn.Linear for a QuantizedLinear in place; returns a report of what it did.

    The report: ``{"scheme", "group_size", "quantized": [names], "skipped": [names], "bytes_before", "bytes_after"}``
    (weights only; the bytes count packed codes, scales and zero points). An lm_head tied to the input embeddings can
    be quantized (``exclude=()``): the embedding keeps its float weight, only the head's matmul goes low-bit.
    """
    group_size = group_size if scheme.startswith("int4") else None
    check_scheme(scheme, group_size)
    chosen = select_linears(model, include, exclude)
    report = {"scheme": scheme, "group_size": group_size, "quantized": [], "skipped": [], "bytes_before": 0, "bytes_after": 0}
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        if name not in chosen:
            report["skipped"].append(name)
            continue
        check_scheme(scheme, group_size, module.in_features, where=name)
        layer = QuantizedLinear.from_float(module, scheme, group_size)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        report["quantized"].append(name)
        report["bytes_before"] += module.weight.numel() * module.weight.element_size()
        report["bytes_after"] += sum(b.numel() * b.element_size() for b in (layer.packed, layer.scales, layer.zeros) if b is not None)
    return report
