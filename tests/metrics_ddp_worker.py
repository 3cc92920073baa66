"""Run by test_metrics.py through torch.multiprocessing.spawn: each of 2 gloo ranks updates every metric with
its half of the data; compute() all-reduces; rank 0 saves the values."""
import torch
import torch.distributed as dist

from lightning_spec.decoding import DecodingStats
from lightning_spec.metrics import (
    AcceptanceRate, ExpectedSpeedup, KLDivergence, MeanAcceptedLength, PositionalAcceptance, TokenAgreement, TopKAgreement,
)


def data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    draft, target = torch.randn(2, 6, 10, 32, generator=g).unbind(0)
    mask = torch.rand(6, 10, generator=g) > 0.3
    stats = [DecodingStats(max_depth=3, accepted=a, row_rounds=r, new_tokens=a + r, position_accepts=[a, a // 2, a // 4], position_attempts=[r, a, a // 2])
             for a, r in [(5, 7), (9, 8), (2, 6), (11, 9)]]
    return draft, target, mask, stats


def metrics():
    return {
        "alpha": AcceptanceRate(temperature=0.8, top_p=0.9), "agreement": TokenAgreement(), "top3": TopKAgreement(k=3),
        "rkl": KLDivergence("reverse"), "speedup": ExpectedSpeedup(gamma=3, cost_ratio=0.2),
        "positional": PositionalAcceptance(gamma=3), "tau": MeanAcceptedLength(),
    }


def run(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    draft, target, mask, stats = data()
    rows = slice(rank, None, 2)
    values = {}
    for name, metric in metrics().items():
        if name in ("positional", "tau"):
            metric.update(stats[rows])
        else:
            metric.update(draft[rows], target[rows], mask[rows])
        values[name] = metric.compute()
    if rank == 0:
        torch.save(values, out)
    dist.barrier()
    dist.destroy_process_group()
