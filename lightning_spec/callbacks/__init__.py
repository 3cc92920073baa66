from lightning_spec.callbacks.acceptance_monitor import AcceptanceRateMonitor
from lightning_spec.callbacks.export_hf import ExportHF, export_hf
from lightning_spec.callbacks.fidelity_report import FidelityReport

__all__ = ["AcceptanceRateMonitor", "ExportHF", "FidelityReport", "export_hf"]
