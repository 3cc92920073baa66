"""Draft-fidelity metrics over next-token distributions: update(draft_logits, target_logits, mask=None)."""
from typing import Any, Optional

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_spec.metrics import functional as F


class _MeanOverPositions(Metric):
    """A masked mean over positions: sums of values and of positions, all-reduced by sum."""

    is_differentiable = False
    full_state_update = False
    plot_lower_bound: Optional[float] = 0.0

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def _accumulate(self, total: Tensor, count: Tensor) -> None:
        self.total += total.to(self.total.device)
        self.count += count.to(self.count.device)

    def compute(self) -> Tensor:
        return F._ratio_compute(self.total, self.count)

    def plot(self, val=None, ax=None):
        return self._plot(val, ax)


class AcceptanceRate(_MeanOverPositions):
    """alpha = mean over valid positions of sum_x min(p(x), q(x)), p and q the target's and the draft's sampling
    distributions at ``temperature`` and ``top_p``: the expected acceptance of speculative sampling.

    Example::

        metric = AcceptanceRate(temperature=0.7)
        metric.update(draft_logits, target_logits, mask=attention_mask.bool())
        self.log("val/alpha", metric)
    """

    higher_is_better = True
    plot_upper_bound = 1.0

    def __init__(self, temperature: float = 1.0, top_p: float = 1.0, **kwargs: Any):
        F._check_temperature(temperature, top_p)
        super().__init__(**kwargs)
        self.temperature, self.top_p = temperature, top_p

    def update(self, draft_logits: Tensor, target_logits: Tensor, mask: Optional[Tensor] = None) -> None:
        self._accumulate(*F._acceptance_rate_update(draft_logits, target_logits, mask, self.temperature, self.top_p))


class TotalVariation(AcceptanceRate):
    """Mean total-variation distance TV(p, q) = 1 - alpha between target and draft."""

    higher_is_better = False

    def __init__(self, temperature: float = 1.0, **kwargs: Any):
        super().__init__(temperature=temperature, **kwargs)

    def compute(self) -> Tensor:
        return 1 - super().compute()


class TokenAgreement(_MeanOverPositions):
    """Greedy top-1 agreement: fraction of valid positions where the draft's argmax is the target's."""

    higher_is_better = True
    plot_upper_bound = 1.0

    def update(self, draft_logits: Tensor, target_logits: Tensor, mask: Optional[Tensor] = None) -> None:
        self._accumulate(*F._token_agreement_update(draft_logits, target_logits, mask))


class TopKAgreement(_MeanOverPositions):
    """Fraction of valid positions where the target's argmax is among the draft's top ``k`` tokens."""

    higher_is_better = True
    plot_upper_bound = 1.0

    def __init__(self, k: int = 5, **kwargs: Any):
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        super().__init__(**kwargs)
        self.k = k

    def update(self, draft_logits: Tensor, target_logits: Tensor, mask: Optional[Tensor] = None) -> None:
        self._accumulate(*F._topk_agreement_update(draft_logits, target_logits, mask, self.k))


class KLDivergence(_MeanOverPositions):
    """Mean KL between target p and draft q: ``direction="forward"`` KL(p || q), ``"reverse"`` KL(q || p)."""

    higher_is_better = False
    plot_upper_bound = None

    def __init__(self, direction: str = "forward", temperature: float = 1.0, **kwargs: Any):
        if direction not in ("forward", "reverse"):
            raise ValueError(f"direction must be 'forward' or 'reverse', got {direction!r}")
        F._check_temperature(temperature)
        super().__init__(**kwargs)
        self.direction, self.temperature = direction, temperature

    def update(self, draft_logits: Tensor, target_logits: Tensor, mask: Optional[Tensor] = None) -> None:
        self._accumulate(*F._kl_divergence_update(draft_logits, target_logits, mask, self.direction, self.temperature))
