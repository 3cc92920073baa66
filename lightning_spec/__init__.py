"""lightning-spec: Lightning plugins to build, distill, quantize and measure speculative-decoding drafts."""
from lightning_spec.callbacks import AcceptanceRateMonitor, ExportHF, FidelityReport
from lightning_spec.data import DistillDataModule
from lightning_spec.distill import DraftDistillationModule
from lightning_spec.models import build_draft, load_causal_lm

__all__ = ["AcceptanceRateMonitor", "DistillDataModule", "DraftDistillationModule", "ExportHF", "FidelityReport", "build_draft", "load_causal_lm"]
