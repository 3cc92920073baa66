"""lightning_spec.metrics against independent float64 numpy references, accumulation, DDP (2 gloo processes),
self.log in a LightningModule, the engine's stats, formulas and bad input."""
import math

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_spec.decoding import DecodingStats, speculative_generate
from lightning_spec.metrics import (
    AcceptanceRate, ExpectedAcceptedLength, ExpectedSpeedup, KLDivergence, MeanAcceptedLength, PositionalAcceptance,
    TokenAgreement, TopKAgreement, TotalVariation,
)
from lightning_spec.metrics import functional as F
from lightning_spec.models import build_draft

import metrics_ddp_worker
from test_decoding import peaky_llama


def np_probs(logits, temperature=1.0, top_p=1.0):
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    if top_p < 1:
        for row in p.reshape(-1, p.shape[-1]):
            order = np.argsort(-row, kind="stable")
            before = np.cumsum(row[order]) - row[order]
            row[order[before >= top_p]] = 0
            row /= row.sum()
    return p


def np_reference(draft, target, mask, temperature=1.0, top_p=1.0, k=3):
    d, t, m = draft.numpy(), target.numpy(), mask.numpy()
    q, p = np_probs(d, temperature, top_p), np_probs(t, temperature, top_p)
    q1, p1 = np_probs(d, temperature), np_probs(t, temperature)
    alpha = np.minimum(p, q).sum(-1)
    agree = d.argmax(-1) == t.argmax(-1)
    topk = np.array([[t[i, j].argmax() in np.argsort(-d[i, j])[:k] for j in range(d.shape[1])] for i in range(d.shape[0])])
    fkl = (p1 * (np.log(p1) - np.log(q1))).sum(-1)
    rkl = (q1 * (np.log(q1) - np.log(p1))).sum(-1)
    return {name: v[m].mean() for name, v in dict(alpha=alpha, agree=agree, topk=topk, fkl=fkl, rkl=rkl).items()}


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    draft = torch.randn(4, 7, 50, generator=g) * 2
    target = draft + torch.randn(4, 7, 50, generator=g)
    return draft, target, torch.rand(4, 7, generator=g) > 0.25


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (1.0, 0.8), (0.6, 0.5)])
def test_functional_matches_numpy(batch, temperature, top_p):
    draft, target, mask = batch
    ref = np_reference(draft, target, mask, temperature, top_p)
    assert F.acceptance_rate(draft, target, mask, temperature, top_p).item() == pytest.approx(ref["alpha"], abs=1e-6)
    assert F.total_variation(draft, target, mask, temperature).item() == pytest.approx(1 - np_reference(draft, target, mask, temperature)["alpha"], abs=1e-6)
    assert F.token_agreement(draft, target, mask).item() == pytest.approx(ref["agree"])
    assert F.topk_agreement(draft, target, mask, k=3).item() == pytest.approx(ref["topk"])
    assert F.kl_divergence(draft, target, mask, "forward", temperature).item() == pytest.approx(ref["fkl"], rel=1e-9)
    assert F.kl_divergence(draft, target, mask, "reverse", temperature).item() == pytest.approx(ref["rkl"], rel=1e-9)


def test_metrics_accumulate_like_the_functional_on_all_data(batch):
    draft, target, mask = batch
    pairs = [
        (AcceptanceRate(temperature=0.8, top_p=0.9), lambda: F.acceptance_rate(draft, target, mask, 0.8, 0.9)),
        (TotalVariation(), lambda: F.total_variation(draft, target, mask)),
        (TokenAgreement(), lambda: F.token_agreement(draft, target, mask)),
        (TopKAgreement(k=3), lambda: F.topk_agreement(draft, target, mask, k=3)),
        (KLDivergence("reverse", temperature=0.5), lambda: F.kl_divergence(draft, target, mask, "reverse", 0.5)),
        (ExpectedAcceptedLength(gamma=4), lambda: F.expected_accepted_length(F.acceptance_rate(draft, target, mask), 4)),
        (ExpectedSpeedup(gamma=3, cost_ratio=0.25), lambda: F.expected_speedup(F.acceptance_rate(draft, target, mask), 3, 0.25)),
    ]
    for metric, functional in pairs:
        for rows in (slice(0, 1), slice(1, 3), slice(3, 4)):
            metric.update(draft[rows], target[rows], mask[rows])
        assert metric.compute().item() == pytest.approx(float(functional()), rel=1e-9)
        assert metric.full_state_update is False and isinstance(metric.higher_is_better, bool)
        metric.reset()
        assert math.isnan(metric.compute().item())


def test_formulas():
    assert F.expected_accepted_length(0.0, 4) == 1.0
    assert F.expected_accepted_length(1.0, 4) == 5.0
    assert F.expected_accepted_length(0.5, 2) == pytest.approx(1.75)
    assert F.expected_speedup(0.8, 4, 0.1) == pytest.approx((1 - 0.8**5) / (0.2 * 1.4))
    alphas = torch.tensor([0.2, 0.6, 0.9])
    assert torch.allclose(F.expected_accepted_length(alphas, 3), (1 - alphas.double() ** 4) / (1 - alphas.double()))
    for alpha, c in [(0.3, 0.5), (0.6, 0.1), (0.9, 0.05), (0.8, 0.02)]:
        best = max(range(1, 17), key=lambda g: F.expected_speedup(alpha, g, c))
        assert F.optimal_gamma(alpha, c) == best
    assert F.optimal_gamma(0.05, 0.9) == 1


def test_metrics_from_engine_runs():
    target = peaky_llama(0)
    draft = build_draft(target, layers=[0])
    ids = torch.randint(1, 512, (2, 6), generator=torch.Generator().manual_seed(3))
    runs = [speculative_generate(target, draft, ids, 20, gamma=3, eos_token_id=[]).stats for _ in range(2)]
    positional, tau = PositionalAcceptance(gamma=3), MeanAcceptedLength()
    positional.update(runs[0])
    positional.update(runs[1:])
    tau.update(runs)
    accepts = torch.tensor([r.position_accepts for r in runs], dtype=torch.float64).sum(0)
    attempts = torch.tensor([r.position_attempts for r in runs], dtype=torch.float64).sum(0)
    assert torch.equal(positional.compute(), accepts / attempts)
    rounds = sum(r.row_rounds for r in runs)
    assert tau.compute().item() == pytest.approx(sum(r.new_tokens for r in runs) / rounds) == DecodingStats.combine(runs).tau
    fig, _ = positional.plot()
    assert fig is not None
    with pytest.raises(ValueError, match="gamma=2"):
        PositionalAcceptance(gamma=2).update(runs[0])


def test_ddp_two_processes_equal_one(tmp_path):
    out = tmp_path / "values.pt"
    mp.spawn(metrics_ddp_worker.run, args=(str(tmp_path / "store"), str(out)), nprocs=2, join=True)
    values = torch.load(out)
    single = {}
    draft, target, mask, stats = metrics_ddp_worker.data()
    for name, metric in metrics_ddp_worker.metrics().items():
        metric.update(stats) if name in ("positional", "tau") else metric.update(draft, target, mask)
        single[name] = metric.compute()
    for name in single:
        torch.testing.assert_close(values[name], single[name], rtol=1e-9, atol=0, equal_nan=True)


class LogsAlpha(LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(8, 8)
        self.alpha = AcceptanceRate()

    def validation_step(self, batch, batch_idx):
        draft, target = batch
        self.alpha.update(self.layer(draft), target)
        self.log("val/alpha", self.alpha, on_epoch=True)


def test_self_log_in_a_lightning_module():
    g = torch.Generator().manual_seed(0)
    draft, target = torch.randn(12, 8, generator=g), torch.randn(12, 8, generator=g)
    module = LogsAlpha()
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(module, DataLoader(TensorDataset(draft, target), batch_size=5))
    with torch.no_grad():
        expected = F.acceptance_rate(module.layer(draft), target)
    assert trainer.callback_metrics["val/alpha"].item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda d, t: F.acceptance_rate(d.softmax(-1), t), "draft_logits looks like probabilities"),
        (lambda d, t: F.token_agreement(d, t.softmax(-1)), "target_logits looks like probabilities"),
        (lambda d, t: F.acceptance_rate(d, t[..., :40]), "same shape"),
        (lambda d, t: F.acceptance_rate(d, t, torch.ones(4, 6, dtype=torch.bool)), "mask must have shape"),
        (lambda d, t: F.acceptance_rate(d, t, temperature=0.0), "temperature"),
        (lambda d, t: F.acceptance_rate(d, t, top_p=1.5), "top_p"),
        (lambda d, t: F.topk_agreement(d, t, k=0), "k must be"),
        (lambda d, t: F.kl_divergence(d, t, direction="both"), "direction"),
        (lambda d, t: F.expected_accepted_length(1.2, 4), "alpha"),
        (lambda d, t: F.expected_accepted_length(0.5, 0), "gamma"),
        (lambda d, t: F.expected_speedup(0.5, 2, -1.0), "cost_ratio"),
        (lambda d, t: ExpectedSpeedup(gamma=0, cost_ratio=0.1), "gamma"),
        (lambda d, t: PositionalAcceptance(gamma=2).update([1, 2]), "DecodingStats"),
    ],
)
def test_bad_input_is_named(batch, call, match):
    draft, target, _ = batch
    with pytest.raises(ValueError, match=match):
        call(draft, target)


def test_scalar_metrics_plot(batch):
    draft, target, mask = batch
    metric = AcceptanceRate()
    metric.update(draft, target, mask)
    fig, ax = metric.plot()
    assert fig is not None and ax is not None
