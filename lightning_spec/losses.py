"""Draft-distillation divergences (DistillSpec grid, vLLM speculators' set), one implementation for all modules.

Every divergence works on log-probabilities over the last dimension, so the same code serves full target
logits and an offline teacher's top-k (``SparseTeacher``): top-k targets are compared on k+1 buckets (the
k tokens and the rest of the vocabulary), which by the data-processing inequality never overstates a
divergence.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Union

import torch
import torch.nn.functional as F


@dataclass
class SparseTeacher:
    """A target's top-k at each position: token ids [..., k] and their log-probabilities [..., k]
    under the full softmax at the temperature the cache was made with (sorted, most likely first)."""

    indices: torch.Tensor
    logprobs: torch.Tensor

    def to(self, device) -> "SparseTeacher":
        return SparseTeacher(self.indices.to(device), self.logprobs.to(device))


Teacher = Union[torch.Tensor, SparseTeacher]


def _log1mexp(logsum: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable near 0.

    x is capped just below 0 (float32's resolution at 1): at x = 0 the value is -inf and both branches'
    gradients are infinite, which turned a top-k covering all the mass into NaN gradients.
    """
    x = logsum.clamp(max=-(2.0**-24))
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def sparse_teacher_from_logits(target_logits: torch.Tensor, k: int, temperature: float = 1.0) -> SparseTeacher:
    logprobs = F.log_softmax(target_logits.float() / temperature, dim=-1)
    top, idx = logprobs.topk(k, dim=-1)
    return SparseTeacher(idx, top)


def paired_logprobs(draft_logits: torch.Tensor, teacher: Teacher, temperature: float = 1.0):
    """Return ``(draft_logp, target_logp)`` on a common support: the full vocabulary, or k+1 buckets."""
    draft_logp = F.log_softmax(draft_logits.float() / temperature, dim=-1)
    if isinstance(teacher, torch.Tensor):
        if teacher.shape != draft_logits.shape:
            raise ValueError(f"target logits {tuple(teacher.shape)} and draft logits {tuple(draft_logits.shape)} differ")
        return draft_logp, F.log_softmax(teacher.float() / temperature, dim=-1)
    idx = teacher.indices.long()
    if idx.shape[:-1] != draft_logits.shape[:-1]:
        raise ValueError(f"teacher top-k {tuple(idx.shape)} does not match draft logits {tuple(draft_logits.shape)}")
    d_top = draft_logp.gather(-1, idx)
    d_rest = _log1mexp(torch.logsumexp(d_top, dim=-1, keepdim=True))
    t_top = teacher.logprobs.float()
    t_rest = _log1mexp(torch.logsumexp(t_top, dim=-1, keepdim=True))
    return torch.cat([d_top, d_rest], -1), torch.cat([t_top, t_rest], -1)


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position; 0·log 0 = 0."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)


def acceptance(draft_logp: torch.Tensor, target_logp: torch.Tensor) -> torch.Tensor:
    """Per-position speculative acceptance β = Σ min(p, q) = 1 - TV(p, q)."""
    return torch.minimum(draft_logp.exp(), target_logp.exp()).sum(-1)


def forward_kl(d, t, **_):
    return _kl(t, d)


def reverse_kl(d, t, **_):
    return _kl(d, t)


def jsd(d, t, beta: float = 0.5, **_):
    """DistillSpec's JSD[β] = β·KL(p‖m) + (1-β)·KL(q‖m), m = β·p + (1-β)·q."""
    m = torch.logaddexp(t + math.log(beta), d + math.log1p(-beta))
    return beta * _kl(t, m) + (1 - beta) * _kl(d, m)


def total_variation(d, t, **_):
    return 1.0 - acceptance(d, t)


def neg_log_acceptance(d, t, **_):
    return -torch.log(acceptance(d, t).clamp_min(1e-8))


def kl_tv_hybrid(d, t, **_):
    """λ·KL + (1-λ)·TV with λ = exp(-3α), α detached: KL while the draft is far, TV (= 1-α) once close."""
    alpha = acceptance(d, t)
    lam = torch.exp(-3.0 * alpha.detach())
    return lam * _kl(t, d) + (1 - lam) * (1 - alpha)


DIVERGENCES: Dict[str, Callable[..., torch.Tensor]] = {
    "fkl": forward_kl,
    "rkl": reverse_kl,
    "jsd": jsd,
    "tvd": total_variation,
    "nla": neg_log_acceptance,
    "hybrid": kl_tv_hybrid,
}
LOSSES = tuple(DIVERGENCES) + ("ce",)


def check_loss_name(loss: str) -> str:
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    return loss


def masked_sum(values: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    return values.sum() if mask is None else (values * mask.to(values.dtype)).sum()


def masked_mean(values: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def distill_loss(
    draft_logits: torch.Tensor,
    teacher: Optional[Teacher],
    loss: str = "fkl",
    *,
    labels: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    reduction: str = "mean",
) -> torch.Tensor:
    """Divergence of the draft from the teacher over ``mask`` positions (``reduction`` "mean" or "sum").

    ``draft_logits`` [..., V]; ``teacher`` full target logits [..., V] or a ``SparseTeacher``;
    ``loss="ce"`` is plain cross-entropy of the draft on ``labels`` [...] (the standard baseline).
    Temperature-scaled divergences are multiplied by T² so gradients keep their scale (Hinton et al.).
    """
    check_loss_name(loss)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    reduce = masked_mean if reduction == "mean" else masked_sum
    if loss == "ce":
        if labels is None:
            raise ValueError("loss='ce' needs labels")
        per_token = F.cross_entropy(draft_logits.float().flatten(0, -2), labels.flatten(), reduction="none")
        return reduce(per_token.view(labels.shape), mask)
    if teacher is None:
        raise ValueError(f"loss={loss!r} needs target logits or an offline teacher")
    d, t = paired_logprobs(draft_logits, teacher, temperature)
    per_token = DIVERGENCES[loss](d, t, beta=jsd_beta)
    return reduce(per_token, mask) * temperature**2


@torch.no_grad()
def fidelity_sums(draft_logits: torch.Tensor, teacher: Teacher, mask: Optional[torch.Tensor] = None):
    """Sums over ``mask`` positions of acceptance α (at T=1) and greedy agreement, and the position count."""
    d, t = paired_logprobs(draft_logits, teacher)
    alpha = acceptance(d, t)
    target_top = teacher.indices[..., 0] if isinstance(teacher, SparseTeacher) else teacher.argmax(-1)
    agree = (draft_logits.argmax(-1) == target_top).to(alpha.dtype)
    if mask is None:
        mask = torch.ones_like(alpha, dtype=torch.bool)
    m = mask.to(alpha.dtype)
    return (alpha * m).sum(), (agree * m).sum(), m.sum()
