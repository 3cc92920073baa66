"""Throughput of CausalLMModule under Lightning's Trainer against a plain PyTorch loop doing the same work, and the
held-out perplexity of SmolLM2-135M-Instruct before and after a short SFT run on the shipped chat data.

Throughput: both runs train a fresh copy of the same model (by default SmolLM2's first 4 layers with its full
vocabulary and tied head) on the same packed SFT batches (builtin:chat, the datamodule's own loader and order),
with the same block-diagonal attention, loss (token-mean cross-entropy on assistant tokens), AdamW parameter groups
and gradient clipping; loss tokens per second of the timed steps (the first is warm-up), median over repeats,
ratios within one run.
Perplexity: SmolLM2 fine-tuned for --sft-steps steps (AdamW, warmup + cosine, packed 512-token rows, clipping),
val/ppl on the 30 held-out conversations' assistant tokens before and after.

    python benchmarks/bench_sft.py [--steps 8] [--repeats 3] [--layers 4] [--sft-steps 12]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import torch
from lightning import Trainer

from bench_distill import StepTimer  # benchmarks run as scripts from this folder
from lightning_spec import CausalLMDataModule, CausalLMModule, WarmupDecayLR, build_draft, load_causal_lm
from lightning_spec.losses import distill_loss
from lightning_spec.models import next_token_logits
from lightning_spec.packing import attention_inputs


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)


def trainer_tokens_per_s(model, tokenizer, datamodule, steps: int) -> float:
    module = CausalLMModule(model=copy.deepcopy(model), tokenizer=tokenizer, optimizer=adamw)
    timer = StepTimer()
    Trainer(max_steps=steps, gradient_clip_val=1.0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, limit_val_batches=0, callbacks=[timer]).fit(module, datamodule=datamodule)
    return sum(timer.tokens) / sum(timer.times)


def plain_loop_tokens_per_s(model, datamodule, steps: int) -> float:
    model = copy.deepcopy(model).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = adamw([{"params": [p for p in params if p.ndim >= 2]}, {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}])
    times, tokens = [], []
    for i, batch in enumerate(datamodule.train_dataloader()):
        if i == steps:
            break
        t = time.perf_counter()
        ids = batch["input_ids"]
        select = batch["loss_mask"][:, 1:] & batch["attention_mask"][:, 1:].bool()
        mask, positions = attention_inputs(batch, torch.float32)
        logits = next_token_logits(model, ids, mask, select, positions)
        loss = distill_loss(logits, None, "ce", labels=ids[:, 1:][select])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if i > 0:
            times.append(time.perf_counter() - t)
            tokens.append(int(select.sum()))
    return sum(tokens) / sum(times)


def throughput(target, tokenizer, args, cache: str) -> None:
    model = build_draft(target, num_layers=args.layers) if args.layers < target.config.num_hidden_layers else target
    dm = CausalLMDataModule(train_files="builtin:chat", val_size=30, max_length=args.max_length, pack=True,
                            batch_size=args.batch_size, tokenizer=tokenizer, cache_dir=cache)
    dm.setup("fit")
    runs = {"plain loop": [], "Trainer": []}
    for _ in range(args.repeats):
        runs["plain loop"].append(plain_loop_tokens_per_s(model, dm, args.steps))
        runs["Trainer"].append(trainer_tokens_per_s(model, tokenizer, dm, args.steps))
    med = {k: statistics.median(v) for k, v in runs.items()}
    print(f"\nSFT throughput, {args.layers}-layer SmolLM2 cut ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params), "
          f"packed rows of {args.max_length}, batch {args.batch_size}, median of {args.repeats} x {args.steps - 1} timed steps, "
          f"{torch.get_num_threads()} threads (padding {dm.stats['train_padding']:.1%}, {dm.stats['train_rows']} rows)")
    print(f"{'run':<14}{'loss tokens/s':>14}{'ratio':>8}  baseline")
    print(f"{'plain loop':<14}{med['plain loop']:>14.0f}{1.0:>8.2f}  -")
    print(f"{'Trainer':<14}{med['Trainer']:>14.0f}{med['Trainer'] / med['plain loop']:>8.2f}  plain loop (goal >= 0.9)")


def perplexity_before_after(tokenizer, args, cache: str) -> None:
    module = CausalLMModule(
        model="smollm2-135m-instruct", optimizer=lambda p: torch.optim.AdamW(p, lr=args.sft_lr, weight_decay=0.01),
        lr_scheduler=lambda opt: WarmupDecayLR(opt, warmup_steps=max(1, args.sft_steps // 10), total_steps=args.sft_steps, min_lr_ratio=0.1),
    )
    dm = CausalLMDataModule(train_files="builtin:chat", val_size=30, max_length=512, pack=True, batch_size=4, cache_dir=cache)
    quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    start = time.perf_counter()
    before = Trainer(**quiet).validate(module, datamodule=dm, verbose=False)[0]
    validate_s = time.perf_counter() - start
    start = time.perf_counter()
    Trainer(max_steps=args.sft_steps, gradient_clip_val=1.0, limit_val_batches=0, **quiet).fit(module, datamodule=dm)
    fit_s = time.perf_counter() - start
    after = Trainer(**quiet).validate(module, datamodule=dm, verbose=False)[0]
    tokens = dm.stats["train_loss_tokens"]
    print(f"\nSmolLM2-135M-Instruct SFT on builtin:chat ({dm.stats['train_samples']} conversations, {dm.stats['train_rows']} packed rows "
          f"of 512, {tokens} assistant tokens), {args.sft_steps} steps of batch 4, AdamW lr {args.sft_lr}, fp32")
    print(f"{'held-out (30 conversations)':<30}{'before':>10}{'after':>10}")
    print(f"{'val/ppl (assistant tokens)':<30}{before['val/ppl']:>10.3f}{after['val/ppl']:>10.3f}")
    print(f"{'val/loss':<30}{before['val/loss']:>10.4f}{after['val/loss']:>10.4f}")
    print(f"wall: validation {validate_s:.0f} s, fit {fit_s:.0f} s ({fit_s / args.sft_steps:.1f} s/step)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--sft-steps", type=int, default=12)
    parser.add_argument("--sft-lr", type=float, default=1e-4)
    args = parser.parse_args()
    torch.manual_seed(0)
    target, tokenizer = load_causal_lm("smollm2-135m-instruct")
    with tempfile.TemporaryDirectory() as cache:
        if args.repeats:
            throughput(target, tokenizer, args, cache)
        if args.sft_steps:
            perplexity_before_after(tokenizer, args, cache)


if __name__ == "__main__":
    main()
