"""lightning-spec: Lightning plugins to build, distill, quantize and measure speculative-decoding drafts, and to
pre-train and fine-tune the models they serve."""
from lightning_spec.callbacks import AcceptanceRateMonitor, ExportHF, FidelityReport, QATScheduler
from lightning_spec.causal_lm import CausalLMModule
from lightning_spec.causal_lm_data import CausalLMDataModule
from lightning_spec.data import DistillDataModule
from lightning_spec.distill import DraftDistillationModule
from lightning_spec.models import build_draft, load_causal_lm
from lightning_spec.schedules import WarmupDecayLR

__all__ = ["AcceptanceRateMonitor", "CausalLMDataModule", "CausalLMModule", "DistillDataModule", "DraftDistillationModule", "ExportHF", "FidelityReport", "QATScheduler", "WarmupDecayLR", "build_draft", "load_causal_lm"]
