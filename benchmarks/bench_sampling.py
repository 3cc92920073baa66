"""The decoding engine's per-step work that is not the model, against what torch and transformers do by default:
drawing one token per row (`decoding.engine.sample`, inverse CDF on one uniform per row, vs `torch.multinomial`)
and appending a step to a layer's KV cache (`decoding.kv.GrowingLayer`, in place into a growing buffer, vs
transformers' `DynamicLayer`, which cats the whole cache). Shapes are SmolLM2's batched sampling in `make demo`
(B=160 rows, V=49152; 3 KV heads of 64 dims, 96 steps after a 68-token prompt). Median of repeats, one run.

    python benchmarks/bench_sampling.py
"""
import statistics
import time

import torch
from transformers.cache_utils import DynamicLayer

from lightning_spec.decoding.engine import sample
from lightning_spec.decoding.kv import GrowingLayer


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def appends(layer_type, B: int, prompt: int, steps: int):
    def run():
        layer = layer_type()
        layer.update(torch.randn(B, 3, prompt, 64), torch.randn(B, 3, prompt, 64))
        step = torch.randn(B, 3, 1, 64)
        for _ in range(steps):
            layer.update(step, step)
    return run


def main():
    torch.manual_seed(0)
    print(f"engine per-step work vs torch/transformers defaults, {torch.get_num_threads()} threads, median")
    print(f"{'work':<34}{'default ms':>12}{'engine ms':>12}{'speedup':>10}")
    for B in (1, 160):
        probs = torch.randn(B, 49152).mul(3).softmax(-1)
        g = torch.Generator().manual_seed(0)
        base = median_ms(lambda: torch.multinomial(probs, 1, generator=g), 20)
        ours = median_ms(lambda: sample(probs, g), 20)
        print(f"{f'sample a token, B={B}, V=49152':<34}{base:>12.2f}{ours:>12.2f}{base / ours:>9.1f}x")
    B, prompt, steps = 160, 68, 96
    base = median_ms(appends(DynamicLayer, B, prompt, steps), 5) / steps
    ours = median_ms(appends(GrowingLayer, B, prompt, steps), 5) / steps
    print(f"{f'KV append per step, one layer, B={B}':<34}{base:>12.2f}{ours:>12.2f}{base / ours:>9.1f}x")


if __name__ == "__main__":
    main()
