"""verify_tree: the compiled op against its pure-PyTorch reference (lightning_spec.ops.reference) on one batch of
draft trees, B=32 requests, N=64 nodes, V=49152 (SmolLM2's vocabulary), in each verification mode.

Baseline: the reference, which walks each tree in Python floats with the kernel's exact arithmetic. For scale, the
table also times one torch.argmax over all [B, N, V] target probabilities, the least any tensor-level PyTorch
greedy verification has to do. Median over repeats, ratios measured in one run.

    python benchmarks/bench_verify.py [--batch 32] [--nodes 64] [--vocab 49152] [--repeats 15] [--device cuda]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from lightning_spec import ops
from lightning_spec.ops import reference


def draft_trees(B: int, N: int, V: int, seed: int = 0):
    """Random trees (each node's parent among the 6 before it) whose first children follow the target's top tokens,
    so that walks go several levels deep, as with a trained draft."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, N, V, generator=g) * 2
    logits.scatter_add_(2, torch.randint(V, (B, N, 1), generator=g), torch.full((B, N, 1), 13.0))  # one confident token
    target = torch.softmax(logits, dim=-1)
    draft = torch.softmax(torch.log(target) + torch.randn(B, N, V, generator=g), dim=-1)
    parents = torch.full((B, N), -1, dtype=torch.long)
    for i in range(1, N):
        parents[:, i] = i - 1 - torch.randint(0, min(i, 6), (B,), generator=g)
    ranked = target.topk(4, dim=-1).indices  # [B, N, 4]
    candidates = torch.zeros(B, N, dtype=torch.long)
    seen = torch.zeros(B, N, dtype=torch.long)  # children placed under each node so far
    for i in range(1, N):
        p = parents[:, i]
        rank = seen[torch.arange(B), p].clamp(max=3)
        candidates[:, i] = ranked[torch.arange(B), p, rank]
        seen[torch.arange(B), p] += 1
    return candidates, parents, target, draft


def median_seconds(fn, repeats: int, device: str) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--nodes", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--reference-repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    candidates, parents, target, draft = (t.to(args.device) for t in draft_trees(args.batch, args.nodes, args.vocab))
    modes = {
        "greedy": dict(greedy=True),
        "sampling, one-hot drafts": dict(draft_probs=None),
        "sampling, draft_probs": dict(draft_probs=draft),
    }
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"verify_tree, B={args.batch} N={args.nodes} V={args.vocab}, float32, {where}, "
          f"implementation {ops.active_implementation()}")
    print(f"{'mode':<26}{'reference ms':>14}{'compiled ms':>13}{'speedup':>10}  mean accepted")
    for name, kwargs in modes.items():
        kwargs = dict(kwargs)
        draft_probs = kwargs.pop("draft_probs", None)
        g = torch.Generator().manual_seed(1)
        uniforms = torch.rand(args.batch, args.nodes + 1, generator=g, dtype=torch.float64).to(args.device)
        if kwargs.get("greedy"):
            uniforms = None

        def run(impl):
            return impl(candidates, parents, target, draft_probs, uniforms=uniforms, **kwargs)

        compiled = median_seconds(lambda: run(ops.verify_tree), args.repeats, args.device)
        ref = median_seconds(lambda: run(reference.verify_tree), args.reference_repeats, args.device)
        same = all(torch.equal(a, b) for a, b in zip(run(ops.verify_tree), run(reference.verify_tree)))
        assert same, f"{name}: compiled and reference disagree"
        accepted = run(ops.verify_tree)[1].double().mean()
        print(f"{name:<26}{ref * 1e3:>14.1f}{compiled * 1e3:>13.2f}{ref / compiled:>9.0f}x  {accepted:.2f}  (goal >= 20x)")
    argmax = median_seconds(lambda: target.argmax(-1), args.repeats, args.device)
    print(f"{'torch.argmax over [B,N,V]':<26}{'':>14}{argmax * 1e3:>13.2f}  (floor of a tensor-level greedy verify)")


if __name__ == "__main__":
    main()
