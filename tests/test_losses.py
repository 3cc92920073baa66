import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_spec.losses import DIVERGENCES, LOSSES, SparseTeacher, distill_loss, fidelity_sums, paired_logprobs, sparse_teacher_from_logits

V = 50


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def kl(p, q):
    return (p * (np.log(p) - np.log(q))).sum(-1)


def reference(name, p, q, beta=0.5):
    """Per-position divergence of draft q from target p, float64, written independently of the library."""
    alpha = 1.0 - 0.5 * np.abs(p - q).sum(-1)
    if name == "fkl":
        return kl(p, q)
    if name == "rkl":
        return kl(q, p)
    if name == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if name == "tvd":
        return 1.0 - alpha
    if name == "nla":
        return -np.log(alpha)
    if name == "hybrid":
        lam = np.exp(-3.0 * alpha)
        return lam * kl(p, q) + (1 - lam) * (1.0 - alpha)
    raise KeyError(name)


def logits(*shape, seed=0, scale=2.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def ref_of(name, d, t, temperature=1.0, beta=0.5):
    p = softmax(t.double().numpy() / temperature)
    q = softmax(d.double().numpy() / temperature)
    return reference(name, p, q, beta)


CASES = [("fkl", 0.5), ("rkl", 0.5), ("jsd", 0.3), ("jsd", 0.5), ("tvd", 0.5), ("nla", 0.5), ("hybrid", 0.5)]


def test_reference_covers_every_divergence():
    assert {name for name, _ in CASES} == set(DIVERGENCES)


@pytest.mark.parametrize("name,beta", CASES)
def test_divergence_matches_numpy(name, beta):
    d, t = logits(16, V, seed=1), logits(16, V, seed=2)
    got = DIVERGENCES[name](F.log_softmax(d, -1), F.log_softmax(t, -1), beta=beta)
    np.testing.assert_allclose(got.double().numpy(), ref_of(name, d, t, beta=beta), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", list(DIVERGENCES))
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_softens_both_and_scales_by_t_squared(name, temperature):
    d, t = logits(8, V, seed=3), logits(8, V, seed=4)
    got = distill_loss(d, t, name, temperature=temperature)
    expected = temperature**2 * ref_of(name, d, t, temperature).mean()
    assert got.item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_mask_and_reduction(name):
    d, t = logits(3, 5, V, seed=5), logits(3, 5, V, seed=6)
    mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(7)) < 0.5
    per_position = ref_of(name, d, t)[mask.numpy()]
    total = distill_loss(d, t, name, mask=mask, reduction="sum")
    mean = distill_loss(d, t, name, mask=mask, reduction="mean")
    assert total.item() == pytest.approx(per_position.sum(), rel=1e-4)
    assert mean.item() == pytest.approx(per_position.mean(), rel=1e-4)


def test_empty_mask_gives_zero_not_nan():
    d, t = logits(4, V, seed=8), logits(4, V, seed=9)
    assert distill_loss(d, t, "fkl", mask=torch.zeros(4, dtype=torch.bool)).item() == 0.0


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_sparse_teacher_with_full_vocabulary_equals_full_logits(name):
    t = logits(6, V, seed=10)
    d_full = logits(6, V, seed=11).requires_grad_()
    d_sparse = d_full.detach().clone().requires_grad_()
    full = distill_loss(d_full, t, name)
    sparse = distill_loss(d_sparse, sparse_teacher_from_logits(t, V), name)
    full.backward()
    sparse.backward()
    assert sparse.item() == pytest.approx(full.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(d_sparse.grad, d_full.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("k", [1, 4, 20])
def test_sparse_fkl_is_the_bucketed_fkl(k):
    d, t = logits(6, V, seed=12), logits(6, V, seed=13)
    p, q = softmax(t.double().numpy()), softmax(d.double().numpy())
    top = np.argsort(-p, -1)[:, :k]

    def buckets(x):
        kept = np.take_along_axis(x, top, -1)
        return np.concatenate([kept, 1 - kept.sum(-1, keepdims=True)], -1)

    expected = kl(buckets(p), buckets(q)).mean()
    assert distill_loss(d, sparse_teacher_from_logits(t, k), "fkl").item() == pytest.approx(expected, rel=1e-4)


# hybrid is left out: its KL/TV weight moves with α, so bucketing need not lower it.
@pytest.mark.parametrize("name", ["fkl", "rkl", "jsd", "tvd", "nla"])
@pytest.mark.parametrize("k", [1, 4, 20])
def test_sparse_teacher_never_overstates(name, k):
    """Data-processing inequality: merging tokens into one bucket cannot increase an f-divergence."""
    d, t = logits(32, V, seed=14), logits(32, V, seed=15)
    full = DIVERGENCES[name](*paired_logprobs(d, t))
    bucketed = DIVERGENCES[name](*paired_logprobs(d, sparse_teacher_from_logits(t, k)))
    assert (bucketed <= full + 1e-6).all()
    assert (bucketed < full).any()


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_gradients_finite(loss, sparse, scale):
    d = logits(8, V, seed=16, scale=scale).requires_grad_()
    t = logits(8, V, seed=17, scale=scale)
    teacher = sparse_teacher_from_logits(t, 5) if sparse else t
    distill_loss(d, teacher, loss, labels=t.argmax(-1), temperature=1.5).backward()
    assert torch.isfinite(d.grad).all() and d.grad.abs().sum() > 0


def test_ce_equals_cross_entropy():
    d = logits(10, V, seed=18)
    labels = torch.randint(V, (10,), generator=torch.Generator().manual_seed(19))
    mask = torch.arange(10) % 3 != 0
    expected = F.cross_entropy(d[mask], labels[mask])
    torch.testing.assert_close(distill_loss(d, None, "ce", labels=labels, mask=mask), expected)


def test_unknown_loss_names_the_choices():
    with pytest.raises(ValueError, match="unknown loss 'kld'.*fkl.*hybrid.*ce"):
        distill_loss(logits(2, V), logits(2, V), "kld")


@pytest.mark.parametrize(
    "kwargs,match",
    [(dict(loss="ce"), "needs labels"), (dict(loss="fkl", teacher=None), "needs target logits"), (dict(reduction="max"), "reduction")],
)
def test_bad_arguments(kwargs, match):
    kwargs = {"teacher": logits(2, V), **kwargs}
    with pytest.raises(ValueError, match=match):
        distill_loss(logits(2, V), **kwargs)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ"):
        distill_loss(logits(2, V), logits(2, V + 1))
    with pytest.raises(ValueError, match="does not match"):
        distill_loss(logits(2, V), SparseTeacher(torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, 4)))


def test_fidelity_sums():
    d, t = logits(5, V, seed=20), logits(5, V, seed=21)
    d[0] = t[0]
    mask = torch.tensor([True, True, False, True, False])
    alpha, agree, n = fidelity_sums(d, t, mask)
    expected_alpha = 1 - ref_of("tvd", d, t)
    assert n.item() == 3
    assert alpha.item() == pytest.approx(expected_alpha[mask.numpy()].sum(), rel=1e-5)
    assert agree.item() == (d.argmax(-1) == t.argmax(-1))[mask].sum().item()
