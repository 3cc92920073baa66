"""Functional forms of lightning_spec.metrics: draft fidelity from logits, and the speculative-decoding formulas.

Metrics over distributions take ``(draft_logits, target_logits, mask=None)`` (torchmetrics' preds/target order):
logits [..., V], mask [...] bool selecting the positions that count. Each has ``_<name>_update`` returning sums
(what a Metric accumulates and all-reduces) and ``_<name>_compute`` turning them into the value.

Formulas (Leviathan et al. 2023): with per-token acceptance alpha, draft length gamma and cost ratio c,
tokens per target call tau = (1 - alpha^(gamma+1)) / (1 - alpha), expected speedup tau / (gamma c + 1).
"""
import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_spec.decoding.engine import warp

Number = Union[float, Tensor]


def _check_logits(draft_logits: Tensor, target_logits: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Validate shapes and that both are logits; return the mask (all positions when None)."""
    for name, x in (("draft_logits", draft_logits), ("target_logits", target_logits)):
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 1:
            raise ValueError(f"{name} must be a floating-point tensor [..., V]")
    if draft_logits.shape != target_logits.shape:
        raise ValueError(f"draft_logits {list(draft_logits.shape)} and target_logits {list(target_logits.shape)} must have the same shape (same vocabulary)")
    for name, x in (("draft_logits", draft_logits), ("target_logits", target_logits)):
        if x.numel() and x.shape[-1] > 1 and bool((x >= 0).all()) and bool(((x.double().sum(-1) - 1).abs() < 1e-4).all()):
            raise ValueError(f"{name} looks like probabilities (non-negative rows summing to 1); pass logits (or log-probs)")
    if mask is None:
        return torch.ones(draft_logits.shape[:-1], dtype=torch.bool, device=draft_logits.device)
    if mask.shape != draft_logits.shape[:-1]:
        raise ValueError(f"mask must have shape {list(draft_logits.shape[:-1])} (the logits without V), got {list(mask.shape)}")
    return mask.bool()


def _check_temperature(temperature: float, top_p: float = 1.0) -> None:
    if not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def _masked_sum(values: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor]:
    return values.double()[mask].sum(), mask.sum().double()


# ---------------------------------------------------------------- acceptance rate and total variation

def _acceptance_rate_update(draft_logits, target_logits, mask=None, temperature=1.0, top_p=1.0):
    mask = _check_logits(draft_logits, target_logits, mask)
    _check_temperature(temperature, top_p)
    q, p = warp(draft_logits, temperature, top_p), warp(target_logits, temperature, top_p)
    return _masked_sum(torch.minimum(p, q).sum(-1), mask)


def _ratio_compute(total: Tensor, count: Tensor) -> Tensor:
    return total / count if count > 0 else torch.tensor(float("nan"), dtype=torch.float64)


def acceptance_rate(draft_logits: Tensor, target_logits: Tensor, mask: Optional[Tensor] = None, temperature: float = 1.0, top_p: float = 1.0) -> Tensor:
    """alpha: mean over positions of sum_x min(p(x), q(x)) of the (temperature, top-p) sampling distributions."""
    return _ratio_compute(*_acceptance_rate_update(draft_logits, target_logits, mask, temperature, top_p))


def total_variation(draft_logits: Tensor, target_logits: Tensor, mask: Optional[Tensor] = None, temperature: float = 1.0) -> Tensor:
    """Mean TV(p, q) = 1 - alpha."""
    return 1 - acceptance_rate(draft_logits, target_logits, mask, temperature)


# ---------------------------------------------------------------- agreement

def _token_agreement_update(draft_logits, target_logits, mask=None):
    mask = _check_logits(draft_logits, target_logits, mask)
    return _masked_sum(draft_logits.argmax(-1) == target_logits.argmax(-1), mask)


def token_agreement(draft_logits: Tensor, target_logits: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Greedy top-1 agreement: fraction of positions where draft argmax == target argmax."""
    return _ratio_compute(*_token_agreement_update(draft_logits, target_logits, mask))


def _topk_agreement_update(draft_logits, target_logits, mask=None, k=5):
    mask = _check_logits(draft_logits, target_logits, mask)
    if not isinstance(k, int) or not 1 <= k <= draft_logits.shape[-1]:
        raise ValueError(f"k must be an integer in [1, V={draft_logits.shape[-1]}], got {k!r}")
    hit = (draft_logits.topk(k, dim=-1).indices == target_logits.argmax(-1, keepdim=True)).any(-1)
    return _masked_sum(hit, mask)


def topk_agreement(draft_logits: Tensor, target_logits: Tensor, mask: Optional[Tensor] = None, k: int = 5) -> Tensor:
    """Fraction of positions where the target's argmax is among the draft's top-k tokens."""
    return _ratio_compute(*_topk_agreement_update(draft_logits, target_logits, mask, k))


# ---------------------------------------------------------------- KL

def _kl_divergence_update(draft_logits, target_logits, mask=None, direction="forward", temperature=1.0):
    mask = _check_logits(draft_logits, target_logits, mask)
    _check_temperature(temperature)
    if direction not in ("forward", "reverse"):
        raise ValueError(f"direction must be 'forward' (KL(target || draft)) or 'reverse' (KL(draft || target)), got {direction!r}")
    logq = F.log_softmax(draft_logits.double() / temperature, -1)
    logp = F.log_softmax(target_logits.double() / temperature, -1)
    a, b = (logp, logq) if direction == "forward" else (logq, logp)
    kl = torch.where(a > -torch.inf, a.exp() * (a - b), torch.zeros_like(a)).sum(-1)
    return _masked_sum(kl, mask)


def kl_divergence(draft_logits: Tensor, target_logits: Tensor, mask: Optional[Tensor] = None, direction: str = "forward", temperature: float = 1.0) -> Tensor:
    """Mean KL between target p and draft q: 'forward' KL(p || q), 'reverse' KL(q || p)."""
    return _ratio_compute(*_kl_divergence_update(draft_logits, target_logits, mask, direction, temperature))


# ---------------------------------------------------------------- formulas

def _check_alpha_gamma(alpha: Number, gamma) -> Tensor:
    alpha = torch.as_tensor(alpha, dtype=torch.float64)
    if bool(((alpha < 0) | (alpha > 1)).any()):  # nan passes: a metric that saw no positions yet
        raise ValueError(f"alpha must be an acceptance probability in [0, 1], got {alpha}")
    gammas = torch.as_tensor(gamma)
    if gammas.is_floating_point() or bool((gammas < 1).any()):
        raise ValueError(f"gamma must be an integer >= 1, got {gamma!r}")
    return alpha


def expected_accepted_length(alpha: Number, gamma) -> Number:
    """tau = (1 - alpha^(gamma+1)) / (1 - alpha): expected tokens per target call (bonus token included)."""
    a = _check_alpha_gamma(alpha, gamma)
    g = torch.as_tensor(gamma, dtype=torch.float64)
    tau = torch.where(a >= 1, g + 1, (1 - a ** (g + 1)) / (1 - a).clamp_min(1e-300))  # nan alpha stays nan
    return tau.item() if tau.dim() == 0 and not isinstance(alpha, Tensor) else tau


def expected_speedup(alpha: Number, gamma, cost_ratio: Number) -> Number:
    """tau / (gamma * c + 1): expected wall-time speedup over the target alone, c = draft step / target step."""
    c = torch.as_tensor(cost_ratio, dtype=torch.float64)
    if bool(((c < 0) | c.isnan()).any()):
        raise ValueError(f"cost_ratio must be >= 0, got {cost_ratio!r}")
    tau = torch.as_tensor(expected_accepted_length(alpha, gamma), dtype=torch.float64)
    speedup = tau / (torch.as_tensor(gamma, dtype=torch.float64) * c + 1)
    return speedup.item() if speedup.dim() == 0 and not isinstance(alpha, Tensor) else speedup


def optimal_gamma(alpha: float, cost_ratio: float, max_gamma: int = 16) -> int:
    """The gamma in 1..max_gamma that maximizes expected_speedup (1 when speculation cannot pay)."""
    gammas = torch.arange(1, max_gamma + 1)
    return int(gammas[torch.as_tensor(expected_speedup(float(alpha), gammas, float(cost_ratio))).argmax()])
