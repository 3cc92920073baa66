from lightning_spec.callbacks.export_hf import ExportHF, export_hf
from lightning_spec.callbacks.fidelity_report import FidelityReport

__all__ = ["ExportHF", "FidelityReport", "export_hf"]
