"""QAT's fake quantization: the compiled op (lightning_spec.ops.fake_quant) against the same numerics in PyTorch ops.

One "step" fake-quantizes every linear weight of SmolLM2-135M (30 layers: q, k, v, o, gate, up, down; 106M weights)
forward and backward, as a QATScheduler does each training step. The baseline is the PyTorch composition the op
replaced: observe (numerics.weight_qparams), the reference fake_quantize, and a masked gradient. Also 8da4w's
per-token activation quantization of a training batch's activations (8 x 170 tokens into every layer). Ratios of
medians measured in one run (times only with --device cuda).

    python benchmarks/bench_fake_quant.py [--repeats 5] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse

import torch

from bench_qmatmul import median_us  # benchmarks run as scripts from this folder
from lightning_spec.ops import reference
from lightning_spec.ops.fake_quant import fake_quantize_activation, fake_quantize_weight
from lightning_spec.quant.numerics import weight_qparams

# SmolLM2-135M's linear layers (out, in), and how many of each
LAYERS = 30
SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
TOKENS = 8 * 170


def pytorch_weight(w: torch.Tensor, scheme: str, group) -> torch.Tensor:
    """The baseline: the op's numerics in PyTorch ops, with the straight-through gradient."""
    scale, zero = weight_qparams(w.detach(), scheme, group)
    out, inside = reference.fake_quantize(w.detach(), scale.contiguous(), zero, scheme=scheme, group_size=group)
    return out + (w - w.detach()) * inside  # forward: out; backward: grad where the clamp did not bite


def pytorch_activation(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    scale, _ = weight_qparams(x2.detach(), "int8")
    out, inside = reference.fake_quantize(x2.detach(), scale.contiguous(), None, scheme="int8")
    return (out + (x2 - x2.detach()) * inside).reshape(x.shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    weights = [(torch.randn(n, k, generator=g) * 0.05).to(args.device).requires_grad_() for _ in range(LAYERS) for n, k in SHAPES]
    activations = [torch.randn(TOKENS, k, generator=g).to(args.device).requires_grad_() for _ in range(LAYERS) for _, k in SHAPES]

    def step(fake, tensors):
        def run():
            for t in tensors:
                fake(t).sum().backward()
        return run

    cases = [
        ("int4 g32 weights, observing", lambda w: fake_quantize_weight(w, "int4", 32), lambda w: pytorch_weight(w, "int4", 32), weights),
        ("int8 per-channel weights", lambda w: fake_quantize_weight(w, "int8"), lambda w: pytorch_weight(w, "int8", None), weights),
        ("int8 per-token activations", fake_quantize_activation, pytorch_activation, activations),
    ]
    print(f"SmolLM2-135M linears: {sum(w.numel() for w in weights) / 1e6:.0f}M weights, {TOKENS} tokens of activations; "
          f"{torch.get_num_threads()} threads on {args.device}; forward + backward, median of {args.repeats}\n")
    print("| fake quantization | PyTorch ops / compiled op |" + (" compiled op ms |" if args.device == "cuda" else ""))
    print("|---|---|" + ("---|" if args.device == "cuda" else ""))
    for label, compiled, baseline, tensors in cases:
        ours, theirs = median_us(step(compiled, tensors), args.repeats, args.device), median_us(step(baseline, tensors), args.repeats, args.device)
        print(f"| {label} | {theirs / ours:.2f}x |" + (f" {ours / 1e3:.1f} |" if args.device == "cuda" else ""))


if __name__ == "__main__":
    main()
