"""ExportHF: write the trained model as a Hugging Face directory (config, safetensors, tokenizer)."""
from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from lightning_spec.quant.export import save_model


def trained_model(pl_module):
    """The model a lightning-spec module trains: a draft module's ``draft``, a standard module's ``model``."""
    return pl_module.draft if hasattr(pl_module, "draft") else pl_module.model


def export_hf(model, tokenizer, dirpath) -> Path:
    """Save ``model`` (and ``tokenizer``) so ``AutoModelForCausalLM.from_pretrained(dirpath)`` loads it; a quantized
    model (QAT's fake-quantized layers, or converted ones) is written dequantized with its scales, which
    ``lightning_spec.models.load_model(dirpath)`` turns back into the same QuantizedLinear layers."""
    path = Path(dirpath)
    path.mkdir(parents=True, exist_ok=True)
    save_model(model, path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


class ExportHF(Callback):
    """At fit end, export the module's ``draft`` (or ``model``) to ``dirpath`` as an HF directory that
    transformers loads and accepts as ``generate(assistant_model=...)``.

    Example::

        Trainer(callbacks=[ExportHF("artifacts/smollm2_draft")])
    """

    def __init__(self, dirpath: str):
        self.dirpath = dirpath

    @rank_zero_only
    def on_fit_end(self, trainer, pl_module) -> None:
        model = trained_model(pl_module)
        path = export_hf(model, getattr(pl_module, "tokenizer", None), self.dirpath)
        rank_zero_info(f"exported {type(model).__name__} to {path}")
