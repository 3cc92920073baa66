"""Goodness of fit for the losslessness tests of the verify ops and the decoding engine."""
import torch


def chi_square_pvalue(counts, probs):
    """Pearson chi-square against probs; cells expected below 5 are pooled. Impossible cells must be empty."""
    assert counts[probs == 0].sum() == 0, "a token with target probability 0 was emitted"
    expected = probs * counts.sum()
    big = expected >= 5
    observed = torch.cat([counts[big], counts[~big & (probs > 0)].sum().view(1)])
    wanted = torch.cat([expected[big], expected[~big & (probs > 0)].sum().view(1)])
    keep = wanted > 0
    statistic = ((observed[keep] - wanted[keep]) ** 2 / wanted[keep]).sum()
    dof = torch.tensor(float(keep.sum() - 1), dtype=torch.float64)
    return float(torch.special.gammaincc(dof / 2, statistic / 2))
