"""Hit-rate metrics: measured from real speculative runs (the engine's DecodingStats), or expected from alpha by
the formulas in lightning_spec.metrics.functional."""
from typing import Any, Iterable, Union

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_spec.decoding.engine import DecodingStats
from lightning_spec.metrics import functional as F
from lightning_spec.metrics.fidelity import AcceptanceRate

Stats = Union[DecodingStats, Iterable[DecodingStats]]


def _runs(stats: Stats):
    runs = [stats] if isinstance(stats, DecodingStats) else list(stats)
    if not all(isinstance(s, DecodingStats) for s in runs):
        raise ValueError("update takes the .stats (DecodingStats) of speculative_generate runs")
    return runs


class PositionalAcceptance(Metric):
    """Acceptance rate at each draft position 1..gamma from real runs: P(position d accepted | d verified).

    Example::

        metric = PositionalAcceptance(gamma=4)
        metric.update(speculative_generate(target, draft, ids, 64, gamma=4).stats)
        fig, ax = metric.plot()
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, gamma: int, **kwargs: Any):
        if not isinstance(gamma, int) or gamma < 1:
            raise ValueError(f"gamma must be an integer >= 1, got {gamma!r}")
        super().__init__(**kwargs)
        self.gamma = gamma
        self.add_state("accepts", torch.zeros(gamma, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("attempts", torch.zeros(gamma, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, stats: Stats) -> None:
        for s in _runs(stats):
            if s.max_depth != self.gamma:
                raise ValueError(f"stats come from runs of depth {s.max_depth}, this metric tracks gamma={self.gamma}")
            self.accepts += torch.tensor(s.position_accepts, dtype=torch.float64, device=self.accepts.device)
            self.attempts += torch.tensor(s.position_attempts, dtype=torch.float64, device=self.attempts.device)

    def compute(self) -> Tensor:
        return self.accepts / self.attempts  # nan where a position was never verified

    def plot(self, val=None, ax=None):
        """Bar chart of acceptance per draft position; returns (fig, ax)."""
        import matplotlib.pyplot as plt

        val = (self.compute() if val is None else val).reshape(-1)  # torchmetrics squeezes gamma=1 to a scalar
        fig, ax = plt.subplots() if ax is None else (ax.get_figure(), ax)
        positions = list(range(1, len(val) + 1))
        ax.bar(positions, val.cpu().float().numpy())
        ax.set(xlabel="draft position", ylabel="acceptance rate", ylim=(0, 1), xticks=positions, title="PositionalAcceptance")
        return fig, ax


class MeanAcceptedLength(Metric):
    """tau from real runs: tokens emitted per target call and sequence, the correction/bonus token included (what
    peers report as acceptance length; DecodingStats.tau pooled over runs)."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    plot_lower_bound = 1.0

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.add_state("tokens", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("rounds", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, stats: Stats) -> None:
        for s in _runs(stats):
            self.tokens += s.new_tokens
            self.rounds += s.row_rounds

    def compute(self) -> Tensor:
        return self.tokens / self.rounds

    def plot(self, val=None, ax=None):
        return self._plot(val, ax)


class ExpectedAcceptedLength(AcceptanceRate):
    """tau expected from the measured alpha at draft length ``gamma``: (1 - alpha^(gamma+1)) / (1 - alpha)."""

    plot_upper_bound = None

    def __init__(self, gamma: int, temperature: float = 1.0, top_p: float = 1.0, **kwargs: Any):
        F._check_alpha_gamma(0.0, gamma)
        super().__init__(temperature=temperature, top_p=top_p, **kwargs)
        self.gamma = gamma

    def compute(self) -> Tensor:
        return F.expected_accepted_length(super().compute(), self.gamma)


class ExpectedSpeedup(AcceptanceRate):
    """Expected speedup over the target alone from the measured alpha, ``gamma`` and the cost ratio c (draft step
    time / target step time); ``optimal_gamma()`` gives the gamma that maximizes it."""

    plot_upper_bound = None

    def __init__(self, gamma: int, cost_ratio: float, temperature: float = 1.0, top_p: float = 1.0, **kwargs: Any):
        F._check_alpha_gamma(0.0, gamma)
        if not cost_ratio >= 0:
            raise ValueError(f"cost_ratio must be >= 0, got {cost_ratio!r}")
        super().__init__(temperature=temperature, top_p=top_p, **kwargs)
        self.gamma, self.cost_ratio = gamma, cost_ratio

    def compute(self) -> Tensor:
        return F.expected_speedup(super().compute(), self.gamma, self.cost_ratio)

    def optimal_gamma(self, max_gamma: int = 16) -> int:
        return F.optimal_gamma(float(AcceptanceRate.compute(self)), self.cost_ratio, max_gamma)
