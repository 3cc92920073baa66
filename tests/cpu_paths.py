"""Run a test on one CPU kernel path: LIGHTNING_SPEC_QMATMUL_ISA caps the run-time choice (csrc/cpu_isa.h)."""
import pytest
import torch


def use_cpu_path(path: str, monkeypatch) -> str:
    """'auto': the best path this CPU has; 'avx512_vnni' / 'avx512' / 'avx2' / 'generic': at most that one (skipped where the CPU
    has no SIMD path at all)."""
    if path == "auto":
        monkeypatch.delenv("LIGHTNING_SPEC_QMATMUL_ISA", raising=False)
        return path
    monkeypatch.setenv("LIGHTNING_SPEC_QMATMUL_ISA", path)
    if path != "generic" and torch.ops.lightning_spec.qmatmul_cpu_isa() == "generic":
        pytest.skip(f"this CPU has no {path}")
    return path
