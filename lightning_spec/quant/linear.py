"""QuantizedLinear (an nn.Linear on packed low-bit weights, run by the compiled kernels) and quantize_model."""
import fnmatch
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from lightning_spec.ops.qmatmul import quantized_linear
from lightning_spec.ops.fake_quant import fake_quantize_activation
from lightning_spec.quant.numerics import check_activation, check_scheme, dequantize_weight, quantize_weight


def apply_keeping_float32(module: nn.Module, apply, fn, recurse: bool, names: Sequence[str]) -> nn.Module:
    """``module._apply`` (``apply``, the base class's) that leaves the float32 tensors ``names`` float32 while
    ``.to(dtype)``, ``.half()`` or a precision plugin casts the rest: the kernels and the numerics take float32
    quantization parameters, and a cast would round them off the grid. Device moves still apply."""
    kept = {n: getattr(module, n).detach() for n in names if getattr(module, n) is not None}
    apply(fn, recurse)
    for n, before in kept.items():
        now = getattr(module, n)
        if now.dtype != before.dtype:
            now.data = before.to(now.device)
    return module


class QuantizedLinear(nn.Module):
    """A linear layer whose weight is stored packed (``packed``, ``scales``, ``zeros`` buffers, so state_dict
    saves and reloads the packed form) and multiplied by lightning_spec.ops.quantized_linear.

    ``activation="int8"`` (int4 schemes) quantizes the input per token first, as w8a8 does inside its kernel: the
    int8-activation/int4-weight scheme ("8da4w") that QAT trains for.

    Example::

        layer = QuantizedLinear.from_float(nn.Linear(576, 1536), scheme="int4", group_size=32)
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, scheme: str = "int4",
                 group_size: Optional[int] = 32, activation: Optional[str] = None, device=None):
        super().__init__()
        group_size = group_size if scheme.startswith("int4") else None
        check_scheme(scheme, group_size, in_features)
        check_activation(scheme, activation)
        self.in_features, self.out_features, self.scheme, self.group_size = in_features, out_features, scheme, group_size
        self.activation = activation
        grouped = scheme.startswith("int4")
        packed_shape = (out_features, in_features // 2) if grouped else (out_features, in_features)
        scale_shape = (out_features, in_features // group_size) if grouped else (out_features,)
        self.register_buffer("packed", torch.zeros(packed_shape, dtype=torch.uint8 if grouped else torch.int8, device=device))
        self.register_buffer("scales", torch.ones(scale_shape, dtype=torch.float32, device=device))
        self.register_buffer("zeros", torch.zeros(scale_shape, dtype=torch.uint8, device=device) if scheme == "int4_asym" else None)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_float(cls, linear: nn.Linear, scheme: str = "int4", group_size: Optional[int] = 32, activation: Optional[str] = None,
                   scales: Optional[Tensor] = None, zeros: Optional[Tensor] = None) -> "QuantizedLinear":
        """Quantize ``linear``'s weight with the numerics' scales, or with given ``scales``/``zeros`` (QAT's)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, scheme=scheme, group_size=group_size,
                    activation=activation, device=linear.weight.device)
        packed, scales, zeros = quantize_weight(linear.weight.detach(), scheme, layer.group_size, scales, zeros)
        layer.packed.copy_(packed)
        layer.scales.copy_(scales)
        if zeros is not None:
            layer.zeros.copy_(zeros)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach().float())
        return layer

    def _apply(self, fn, recurse=True):
        return apply_keeping_float32(self, super()._apply, fn, recurse, ("scales",))

    def get_extra_state(self) -> dict:
        # int8 and w8a8 (and int4 with or without int8 activations) pack into buffers of the same shapes: the
        # state_dict names its numerics so that a load into a layer of another scheme fails instead of computing
        # something else
        return {"scheme": self.scheme, "group_size": self.group_size, "activation": self.activation}

    def set_extra_state(self, state: dict) -> None:
        mine = self.get_extra_state()
        if state != mine:
            raise ValueError(f"QuantizedLinear: the state_dict holds a layer quantized as {state}, this layer is {mine}")

    def dequantized_weight(self) -> Tensor:
        return dequantize_weight(self.packed, self.scales, self.zeros, scheme=self.scheme, group_size=self.group_size)

    def forward(self, x: Tensor) -> Tensor:
        if not x.is_floating_point():
            raise ValueError(f"QuantizedLinear takes floating-point input, got {x.dtype}")
        out_dtype = x.dtype
        if x.dtype not in (torch.float32, torch.bfloat16):
            x = x.float()
        if self.activation == "int8":
            x = fake_quantize_activation(x).to(x.dtype)
        y = quantized_linear(x, self.packed, self.scales, self.zeros, scheme=self.scheme, group_size=self.group_size, bias=self.bias)
        return y.to(out_dtype)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        activation = f", activation={self.activation}" if self.activation else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}{group}{activation}, "
                f"bias={self.bias is not None}")


def _matches(name: str, patterns: Optional[Sequence[str]]) -> bool:
    """A pattern matches a module name, or the name of a module above it, by glob (``"*.q_proj"``,
    ``"model.layers.0"``) or as the start of a dotted component (``"lm_head"``, ``"mlp"``, ``"embed"`` for
    ``embed_tokens``)."""
    parts = name.split(".")
    scopes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return bool(patterns) and any(
        any(fnmatch.fnmatch(scope, p) for scope in scopes) or any(part.startswith(p) for part in parts) for p in patterns
    )


def select_linears(model: nn.Module, include: Optional[Sequence[str]], exclude: Sequence[str], kind=nn.Linear,
                   default_exclude: Sequence[str] = ()) -> List[str]:
    """Names of the ``kind`` modules that ``include`` (None: all) and not ``exclude`` select, every name of a layer
    registered under several (selected when all of them are). Errors for an include pattern that selects no such
    layer and an exclude pattern, other than one of ``default_exclude``, that matches no module at all. The
    linear children of nn.MultiheadAttention and nn.TransformerEncoderLayer are never selected: those read their
    weights instead of calling them."""
    include, exclude = ([p] if isinstance(p, str) else p for p in (include, exclude))  # one pattern, not its letters
    named = list(model.named_modules(remove_duplicate=False))
    readers = (nn.MultiheadAttention, nn.TransformerEncoderLayer)
    read_directly = {id(c) for _, m in named if isinstance(m, readers) for c in m.children()}
    names = [n for n, m in named if isinstance(m, kind) and id(m) not in read_directly]
    for label, patterns, pool in (("include", include, names), ("exclude", exclude, [n for n, _ in named])):
        for p in patterns or ():
            if label == "exclude" and p in default_exclude:
                continue
            if not any(_matches(n, [p]) for n in pool):
                raise ValueError(f"{label} pattern {p!r} matches no {'nn.Linear' if label == 'include' else 'module'} in the "
                                 f"model (it has e.g. {names[:3]})")
    aliases: Dict[int, List[str]] = {}
    for n, m in named:
        aliases.setdefault(id(m), []).append(n)
    selected = {n for n in names if (include is None or _matches(n, include)) and not _matches(n, exclude)}
    return [n for n in names if all(a in selected for a in aliases[id(model.get_submodule(n))])]


def quantize_model(model: nn.Module, scheme: str = "int4", group_size: Optional[int] = 32,
                   include: Optional[Sequence[str]] = None, exclude: Sequence[str] = ("lm_head",),
                   activation: Optional[str] = None) -> Dict[str, object]:
    """Swap every selected nn.Linear for a QuantizedLinear (post-training quantization) in place; returns a report.

    Patterns match module names or the names above them (see select_linears); the default ``exclude`` may match
    nothing (a model without ``lm_head``), a pattern given that matches nothing is an error.
    The report: ``{"scheme", "group_size", "quantized": [names], "skipped": [names], "bytes_before", "bytes_after"}``
    (weights only; the bytes count packed codes, scales and zero points). An lm_head tied to the input embeddings can
    be quantized (``exclude=()``): the embedding keeps its float weight, only the head's matmul goes low-bit.
    """
    group_size = group_size if scheme.startswith("int4") else None
    check_scheme(scheme, group_size)
    check_activation(scheme, activation)
    chosen = select_linears(model, include, exclude, default_exclude=("lm_head",))
    for name in chosen:  # every layer checked before any is swapped: an error leaves the model as it was
        check_scheme(scheme, group_size, model.get_submodule(name).in_features, where=name)
    report = {"scheme": scheme, "group_size": group_size, "quantized": [], "skipped": [], "bytes_before": 0, "bytes_after": 0}
    swapped: Dict[int, QuantizedLinear] = {}  # one QuantizedLinear per layer, under each of its names
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if not isinstance(module, nn.Linear):
            continue
        if name not in chosen:
            report["skipped"].append(name)
            continue
        if id(module) not in swapped:
            layer = swapped[id(module)] = QuantizedLinear.from_float(module, scheme, group_size, activation)
            report["bytes_before"] += module.weight.numel() * module.weight.element_size()
            report["bytes_after"] += sum(b.numel() * b.element_size() for b in (layer.packed, layer.scales, layer.zeros) if b is not None)
        swap_module(model, name, swapped[id(module)])
        report["quantized"].append(name)
    return report


def swap_module(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, layer)
