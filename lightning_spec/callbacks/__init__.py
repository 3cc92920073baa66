from lightning_spec.callbacks.acceptance_monitor import AcceptanceRateMonitor
from lightning_spec.callbacks.export_hf import ExportHF, export_hf
from lightning_spec.callbacks.fidelity_report import FidelityReport
from lightning_spec.callbacks.qat import QATScheduler

__all__ = ["AcceptanceRateMonitor", "ExportHF", "FidelityReport", "QATScheduler", "export_hf"]
