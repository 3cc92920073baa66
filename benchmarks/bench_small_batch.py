"""small_batch_linear (SmallBatchLinear) against ATen's F.linear, float32 on CPU, at decode/verification row counts.

Layers: SmolLM2-135M's shapes (attention, MLP, the 49152-token head) at M rows. Model: one SmolLM2 forward of q new
tokens on a 60-token KV cache (the engine's CachedLM), stock nn.Linear against use_small_batch_linear, both in one
run: a verification of q tokens should cost about one decode step. Attention: the same forward with the engine's
grouped-query attention against transformers' SDPA path (which repeats the cache per query head), at 60 and 1,000
cached tokens, in interleaved rounds. Median of many runs, ratios in one run.

    python benchmarks/bench_small_batch.py [--repeats 40] [--target smollm2-135m-instruct]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import statistics

import torch
import torch.nn.functional as F

from bench_sampling import median_ms  # benchmarks run as scripts from this folder
from lightning_spec import load_causal_lm
import lightning_spec.decoding.kv as kv
from lightning_spec.decoding import use_small_batch_linear
from lightning_spec.decoding.attention import grouped_attention
from lightning_spec.decoding.kv import CachedLM
from lightning_spec.ops import small_batch_linear

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]
ROWS = [1, 3, 5, 8, 16]


def forward_ms(model, q: int, repeats: int, context: int = 60) -> float:
    lm = CachedLM(model, 1, torch.device("cpu"))
    ids = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    lm.forward(ids, torch.arange(context)[None], torch.ones(context, context, dtype=torch.bool).tril()[None])
    lm.commit(torch.ones(1, context, dtype=torch.bool))
    tokens, see = ids[:, :q], torch.ones(q, q, dtype=torch.bool).tril()[None]

    def step():  # q uncommitted tokens after the same committed context (the cache grows; the mask hides them)
        lm.forward(tokens, lm.length[:, None] + torch.arange(q)[None], see)

    return median_ms(step, repeats)


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--target", default="smollm2-135m-instruct")
    args = parser.parse_args()
    print(f"float32 on {torch.get_num_threads()} threads, median of {args.repeats}; each cell: F.linear ms / "
          f"small_batch_linear ms = speedup")
    print(f"{'N x K':>12} " + " ".join(f"{f'M={m}':>22}" for m in ROWS))
    for N, K in SHAPES:
        w = torch.randn(N, K) * 0.02
        cells = []
        for M in ROWS:
            x = torch.randn(M, K)
            ours, theirs = median_ms(lambda: small_batch_linear(x, w), args.repeats), median_ms(lambda: F.linear(x, w), args.repeats)
            cells.append(f"{theirs:.3f}/{ours:.3f}={theirs / ours:.1f}x")
        print(f"{f'{N}x{K}':>12} " + " ".join(f"{c:>22}" for c in cells))

    stock, _ = load_causal_lm(args.target)
    stock.eval()
    swapped = copy.deepcopy(stock)
    use_small_batch_linear(swapped)
    print(f"\n{args.target}: one forward of q tokens after 60 cached ones (ms), relative to q = 1 with nn.Linear")
    print(f"{'q':>3}{'nn.Linear':>11}{'SmallBatchLinear':>18}{'speedup':>9}{'nn.Linear vs q=1':>18}{'SBL vs q=1':>12}")
    base = {}
    for q in (1, 3, 5, 8):
        t = {name: forward_ms(model, q, max(10, args.repeats // 4)) for name, model in (("stock", stock), ("swapped", swapped))}
        base = base or t
        print(f"{q:>3}{t['stock']:>11.1f}{t['swapped']:>18.1f}{t['stock'] / t['swapped']:>8.2f}x"
              f"{t['stock'] / base['stock']:>17.2f}x{t['swapped'] / base['stock']:>11.2f}x")

    print(f"\n{args.target} with SmallBatchLinear: one forward of q tokens (ms), the engine's grouped-query attention "
          "against transformers' SDPA path with repeat_kv, median of 5 interleaved rounds")
    print(f"{'context':>8}{'q':>3}{'repeat_kv':>11}{'grouped':>9}{'speedup':>9}")
    for context in (60, 1000):
        for q in (2, 5):
            t = {"grouped": [], "repeat_kv": []}
            for _ in range(5):
                for name in t:
                    kv.grouped_attention = grouped_attention if name == "grouped" else (lambda model: contextlib.nullcontext())
                    t[name].append(forward_ms(swapped, q, max(6, args.repeats // 8), context))
            kv.grouped_attention = grouped_attention
            grouped, repeated = statistics.median(t["grouped"]), statistics.median(t["repeat_kv"])
            print(f"{context:>8}{q:>3}{repeated:>11.1f}{grouped:>9.1f}{repeated / grouped:>8.2f}x")


if __name__ == "__main__":
    main()
