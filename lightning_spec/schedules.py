"""Learning-rate schedules that YAML can name: linear warmup, then cosine, linear or constant decay."""
from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

DECAYS = ("cosine", "linear", "constant")


class WarmupDecayLR(LRScheduler):
    """Linear warmup to the optimizer's lr over the first ``warmup_steps`` steps, then ``decay`` to
    ``min_lr_ratio`` × lr at ``total_steps`` (held there after). Stepped once per optimizer step; the same
    shape as transformers' ``get_cosine_schedule_with_warmup`` / ``get_linear_schedule_with_warmup``, but a
    class, so LightningCLI takes it with ``init_args``.

    Example::

        lr_scheduler:
          class_path: lightning_spec.WarmupDecayLR
          init_args: {warmup_steps: 20, total_steps: 200, decay: cosine, min_lr_ratio: 0.1}
    """

    def __init__(self, optimizer: Optimizer, warmup_steps: int, total_steps: int, decay: str = "cosine",
                 min_lr_ratio: float = 0.0, last_epoch: int = -1):
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if total_steps <= warmup_steps:
            raise ValueError(f"total_steps must be > warmup_steps={warmup_steps}, got {total_steps}")
        if decay not in DECAYS:
            raise ValueError(f"decay must be one of {DECAYS}, got {decay!r}")
        if not 0 <= min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.warmup_steps, self.total_steps, self.decay, self.min_lr_ratio = warmup_steps, total_steps, decay, min_lr_ratio
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        """The multiplier of the base lr at optimizer step ``step``."""
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        if self.decay == "constant":
            shape = 1.0
        elif self.decay == "linear":
            shape = 1.0 - progress
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape

    def get_lr(self):
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]
