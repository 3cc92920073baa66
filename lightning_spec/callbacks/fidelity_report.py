"""FidelityReport: measure the draft before and after fit on the held-out split and print the table."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional

from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException


class FidelityReport(Callback):
    """At fit start and fit end, measure α (mean Σ min(p, q)), greedy agreement and τ at ``gamma`` of the
    module's draft against its target on the datamodule's validation split; print a before/after table
    and write it as JSON to ``path``.

    Example::

        Trainer(callbacks=[FidelityReport(gamma=4, path="artifacts/fidelity.json")])
    """

    def __init__(self, gamma: int = 4, path: Optional[str] = None):
        if gamma < 1:
            raise MisconfigurationException(f"gamma must be >= 1, got {gamma}")
        self.gamma = gamma
        self.path = Path(path) if path else None
        self.before: Optional[Dict[str, float]] = None
        self.after: Optional[Dict[str, float]] = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(gamma=self.gamma)

    def _measure(self, trainer, pl_module) -> Dict[str, float]:
        if not hasattr(pl_module, "measure"):
            raise MisconfigurationException("FidelityReport needs a module with a draft and target (measure())")
        return pl_module.measure(trainer.datamodule.val_dataloader(), gamma=self.gamma)

    @rank_zero_only
    def on_fit_start(self, trainer, pl_module) -> None:
        if self.before is None:  # a resumed run keeps the first measurement
            self.before = self._measure(trainer, pl_module)

    @rank_zero_only
    def on_fit_end(self, trainer, pl_module) -> None:
        self.after = self._measure(trainer, pl_module)
        print(self.table())
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"gamma": self.gamma, "before": self.before, "after": self.after}, indent=2))

    def table(self) -> str:
        rows = [("alpha (mean sum min(p,q))", "alpha"), ("greedy agreement", "agreement"), (f"tau at gamma={self.gamma}", "tau")]
        lines = [f"{'held-out fidelity':<28}{'before':>10}{'after':>10}", "-" * 48]
        for label, key in rows:
            b = self.before[key] if self.before else float("nan")
            a = self.after[key] if self.after else float("nan")
            lines.append(f"{label:<28}{b:>10.3f}{a:>10.3f}")
        lines.append(f"{'positions':<28}{(self.after or self.before or {}).get('tokens', 0):>20}")
        return "\n".join(lines)

    def state_dict(self):
        return {"before": self.before}

    def load_state_dict(self, state_dict):
        self.before = state_dict.get("before")
