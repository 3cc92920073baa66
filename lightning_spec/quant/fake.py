"""Quantization-aware training layers: FakeQuantLinear (an nn.Linear computing with the quantized numerics),
prepare_qat (swap them in) and convert (swap in the QuantizedLinear kernels that compute the same).

A FakeQuantLinear keeps its float weight (the latent weight the optimizer updates) and goes through three phases,
held in its ``qat_phase`` buffer so that any checkpoint carries them:
  OFF      a plain linear layer (torchtune's fake_quant_after_n_steps: fake quant starts later)
  OBSERVE  scales follow the current weight each forward (the numerics' min/max statistics)
  FROZEN   scales fixed at their value when frozen; with learned scales (LSQ) the optimizer trains them
"""
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_spec.ops.fake_quant import fake_quantize_activation, fake_quantize_weight
from lightning_spec.quant.linear import QuantizedLinear, apply_keeping_float32, select_linears, swap_module
from lightning_spec.quant.numerics import _TINY, check_activation, check_scheme, weight_qparams

OFF, OBSERVE, FROZEN = 0, 1, 2
PHASES = ("off", "observe", "frozen")
DEFAULT_EXCLUDE = ("lm_head", "embed")  # may match nothing (a model without them); a pattern given must match


class FakeQuantLinear(nn.Linear):
    """nn.Linear whose forward fake-quantizes its weight (``weight`` scheme, ``group_size``) and, with
    ``activation="int8"``, its input per token, exactly as QuantizedLinear would compute.

    ``weight_scale`` (and ``weight_zero`` for int4_asym) are [out_features, groups] float32; ``weight_scale`` is a
    Parameter when ``learn_scales`` (its ``requires_grad`` is the trainer's business), a buffer otherwise.

    Example::

        layer = FakeQuantLinear.from_linear(nn.Linear(576, 1536), weight="int4", group_size=32)
        layer.set_phase(OBSERVE)
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, weight: str = "int4",
                 group_size: Optional[int] = 32, activation: Optional[str] = None, learn_scales: bool = False,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.scheme = "w8a8" if weight == "int8" and activation == "int8" else weight
        self.group_size = group_size if weight.startswith("int4") else None
        check_scheme(self.scheme, self.group_size, in_features)
        self.activation = activation if self.scheme != "w8a8" else None  # w8a8's kernel quantizes activations itself
        check_activation(self.scheme, self.activation)
        groups = in_features // self.group_size if self.group_size else 1
        scale = torch.ones(out_features, groups, dtype=torch.float32, device=device)
        if learn_scales:
            self.weight_scale = nn.Parameter(scale, requires_grad=False)
        else:
            self.register_buffer("weight_scale", scale)
        zero = torch.zeros(out_features, groups, dtype=torch.float32, device=device) if self.scheme == "int4_asym" else None
        self.register_buffer("weight_zero", zero)
        self.register_buffer("qat_phase", torch.tensor(OFF, dtype=torch.uint8, device=device))
        self.phase = OFF  # a Python copy of qat_phase: forward must not sync with the device to read it
        self.register_load_state_dict_post_hook(lambda module, _: setattr(module, "phase", int(module.qat_phase)))

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "FakeQuantLinear":
        """Wrap ``linear``, sharing its weight and bias Parameters (tied weights stay tied)."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta", **kwargs)
        layer.to_empty(device=linear.weight.device)  # no initialization of a weight about to be replaced
        layer.weight, layer.bias = linear.weight, linear.bias
        with torch.no_grad():
            layer.weight_scale.fill_(1.0)
            layer.qat_phase.fill_(OFF)
            if layer.weight_zero is not None:
                layer.weight_zero.zero_()
        return layer

    def _apply(self, fn, recurse=True):
        return apply_keeping_float32(self, super()._apply, fn, recurse, ("weight_scale", "weight_zero"))

    @property
    def learn_scales(self) -> bool:
        return isinstance(self.weight_scale, nn.Parameter)

    def observed_qparams(self):
        """The numerics' scales and zero points for the current weight."""
        return weight_qparams(self.weight.detach(), self.scheme, self.group_size)

    def qparams(self):
        """The scales and zero points the layer computes with now (and convert packs with)."""
        if self.phase == FROZEN:
            return self.weight_scale.clamp_min(_TINY), self.weight_zero
        return self.observed_qparams()

    @torch.no_grad()
    def set_phase(self, phase: int) -> None:
        """Move to ``phase``; entering FROZEN fixes the scales at the current weight's."""
        if phase == FROZEN and self.phase != FROZEN:
            scale, zero = self.observed_qparams()
            self.weight_scale.copy_(scale)
            if zero is not None:
                self.weight_zero.copy_(zero)
        self.phase = phase
        self.qat_phase.fill_(phase)

    def forward(self, x: Tensor) -> Tensor:
        if self.phase == OFF:
            return super().forward(x)
        if self.phase == OBSERVE:  # the op writes the statistics into the buffers: the last ones go into checkpoints
            scale, zero = self.weight_scale.detach(), self.weight_zero
        else:
            scale, zero = self.qparams()
        weight = fake_quantize_weight(self.weight, self.scheme, self.group_size, scale, zero, observe=self.phase == OBSERVE)
        weight = weight.to(self.weight.dtype)
        if self.activation == "int8" or self.scheme == "w8a8":
            x = fake_quantize_activation(x).to(x.dtype)
        return F.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        activation = ", activation=int8" if self.activation or self.scheme == "w8a8" else ""
        learned = ", learn_scales=True" if self.learn_scales else ""
        return f"{super().extra_repr()}, scheme={self.scheme}{group}{activation}{learned}, phase={PHASES[self.phase]}"


def prepare_qat(model: nn.Module, weight: str = "int4", group_size: Optional[int] = 32, activation: Optional[str] = None,
                include: Optional[Sequence[str]] = None, exclude: Sequence[str] = DEFAULT_EXCLUDE,
                learn_scales: bool = False, phase: int = OFF) -> List[FakeQuantLinear]:
    """Swap the selected nn.Linear layers of ``model`` for FakeQuantLinear in ``phase``, in place; layers already
    swapped are kept as they are (a second fit or a validate after fit). Returns every FakeQuantLinear.

    Errors name the layer whose in_features the group size does not divide, and patterns that select nothing.
    """
    if weight not in ("int8", "int4", "int4_asym"):
        raise ValueError(f"weight must be 'int8', 'int4' or 'int4_asym', got {weight!r}")
    chosen = select_linears(model, include, exclude, kind=(nn.Linear,), default_exclude=DEFAULT_EXCLUDE)
    fresh = [n for n in chosen if not isinstance(model.get_submodule(n), FakeQuantLinear)]
    for name in fresh:
        linear = model.get_submodule(name)
        if weight.startswith("int4") and linear.in_features % group_size:
            raise ValueError(f"group_size {group_size} does not divide in_features {linear.in_features} of layer {name!r}")
    swapped: Dict[int, FakeQuantLinear] = {}  # one FakeQuantLinear per layer, under each of its names
    for name in fresh:
        linear = model.get_submodule(name)
        if id(linear) not in swapped:
            swapped[id(linear)] = FakeQuantLinear.from_linear(linear, weight=weight, group_size=group_size,
                                                              activation=activation, learn_scales=learn_scales)
            swapped[id(linear)].set_phase(phase)
        swap_module(model, name, swapped[id(linear)])
    return fake_quant_layers(model)


def fake_quant_layers(model: nn.Module) -> List[FakeQuantLinear]:
    return [m for m in model.modules() if isinstance(m, FakeQuantLinear)]


@torch.no_grad()
def convert(model: nn.Module) -> Dict[str, object]:
    """Swap every FakeQuantLinear of ``model`` for the QuantizedLinear that computes what it computes (the same
    codes, scales and activation quantization, run by the compiled kernels), in place. Returns
    ``{"converted": [names], "bytes_before", "bytes_after"}``.

    Example::

        report = convert(module.draft)   # after Trainer(callbacks=[QATScheduler(...)]).fit(module)
    """
    report = {"converted": [], "bytes_before": 0, "bytes_after": 0}
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]:
        scale, zero = layer.qparams()
        quantized = QuantizedLinear.from_float(layer, layer.scheme, layer.group_size, layer.activation, scale, zero)
        swap_module(model, name, quantized)
        report["converted"].append(name)
        report["bytes_before"] += layer.weight.numel() * layer.weight.element_size()
        report["bytes_after"] += sum(b.numel() * b.element_size() for b in (quantized.packed, quantized.scales, quantized.zeros) if b is not None)
    if not report["converted"]:
        raise ValueError("convert: the model has no FakeQuantLinear layer (was it prepared for QAT?)")
    return report
