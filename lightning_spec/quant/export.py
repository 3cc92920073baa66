"""Quantized models in a Hugging Face directory, and back.

The directory holds a plain float checkpoint that transformers loads as is: each quantized layer's weight is
written dequantized ((q - z) * s), so the plain model computes what the weight-only kernel computes. The config
names the quantized layers and their scheme (``lightning_spec_quantization``), and ``quantization.safetensors``
holds their scales and zero points, from which `requantize` recovers the exact codes: load_model returns the
QuantizedLinear model that was exported, bit for bit (float32 checkpoints; the default).
"""
import copy
from pathlib import Path
from typing import Dict, Tuple

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lightning_spec.quant.fake import OFF, FakeQuantLinear
from lightning_spec.quant.linear import QuantizedLinear, swap_module

CONFIG_KEY = "lightning_spec_quantization"
QPARAMS_FILE = "quantization.safetensors"


def _plain_linear(layer: nn.Module, weight: nn.Parameter) -> nn.Linear:
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    linear.weight, linear.bias = weight, layer.bias
    return linear


@torch.no_grad()
def dequantized_copy(model: nn.Module) -> Tuple[nn.Module, Dict[str, dict], Dict[str, Tensor]]:
    """A copy of ``model`` with plain nn.Linear layers only, and what restores the quantized ones.

    Returns ``(copy, schemes, qparams)``: a QuantizedLinear, or a FakeQuantLinear that fake-quantizes (its
    convert), becomes an nn.Linear holding its dequantized weight, its scheme goes to ``schemes[name]`` and its
    scales and zero points to ``qparams["<name>.scales"/".zeros"]``; a FakeQuantLinear still off becomes its
    float layer. A quantized output layer tied to the input embeddings cannot be written this way (the file
    holds one tensor for both): ValueError.
    """
    model = copy.deepcopy(model)
    tied_head = model.get_output_embeddings() if getattr(model.config, "tie_word_embeddings", False) else None
    schemes, qparams = {}, {}
    for name, layer in list(model.named_modules()):
        if not isinstance(layer, (FakeQuantLinear, QuantizedLinear)):
            continue
        if isinstance(layer, FakeQuantLinear) and layer.phase == OFF:
            swap_module(model, name, _plain_linear(layer, layer.weight))  # the same Parameter: ties stay
            continue
        if layer is tied_head:
            raise ValueError(f"cannot export the quantized layer {name!r}: it is the output layer tied to the input "
                             "embeddings (untie them, or keep it out of quantization)")
        if isinstance(layer, FakeQuantLinear):
            layer = QuantizedLinear.from_float(layer, layer.scheme, layer.group_size, layer.activation, *layer.qparams())
        swap_module(model, name, _plain_linear(layer, nn.Parameter(layer.dequantized_weight(), requires_grad=False)))
        schemes[name] = {"scheme": layer.scheme, "group_size": layer.group_size, "activation": layer.activation}
        qparams[f"{name}.scales"] = layer.scales.contiguous()
        if layer.zeros is not None:
            qparams[f"{name}.zeros"] = layer.zeros.contiguous()
    return model, schemes, qparams


def save_model(model: nn.Module, directory: Path) -> None:
    """``save_pretrained`` (safetensors) that also writes models holding quantized or QAT layers: as the plain
    dequantized checkpoint, the schemes in its config and the scales and zero points beside it (see above)."""
    if not any(isinstance(m, (FakeQuantLinear, QuantizedLinear)) for m in model.modules()):
        model.save_pretrained(directory, safe_serialization=True)
        return
    plain, schemes, qparams = dequantized_copy(model)
    if schemes:
        setattr(plain.config, CONFIG_KEY, schemes)
    plain.save_pretrained(directory, safe_serialization=True)
    if schemes:
        save_file(qparams, str(Path(directory) / QPARAMS_FILE))


@torch.no_grad()
def requantize(model: nn.Module, directory: Path) -> nn.Module:
    """Swap the layers the config of a `save_quantized` directory names back to QuantizedLinear, in place (their
    codes recovered exactly from the dequantized weights and the stored scales); other models are returned as is."""
    schemes = getattr(model.config, CONFIG_KEY, None)
    if not schemes:
        return model
    path = Path(directory) / QPARAMS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} declares quantized layers ({CONFIG_KEY} in config.json) but has no {QPARAMS_FILE}")
    qparams = load_file(str(path))
    for name, spec in schemes.items():
        linear = model.get_submodule(name)
        layer = QuantizedLinear.from_float(linear.float(), spec["scheme"], spec["group_size"], spec["activation"],
                                           qparams[f"{name}.scales"], qparams.get(f"{name}.zeros"))
        swap_module(model, name, layer.to(linear.weight.device))
    return model
