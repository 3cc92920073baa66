"""Throughput of DraftDistillationModule under Lightning's Trainer against a plain PyTorch loop doing the
same forward/backward, and of offline-teacher mode against the online target.

Baselines: a hand-written loop (same draft forward, target forward, loss, AdamW step) for the Trainer;
the online module for the offline teacher. Ratios measured in one run, median over repeats.

    python benchmarks/bench_distill.py [--steps 12] [--repeats 3] [--target smollm2-135m-instruct]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from lightning import Callback, Trainer

from lightning_spec import DistillDataModule, DraftDistillationModule, load_causal_lm
from lightning_spec.losses import distill_loss
from lightning_spec.models import build_draft, next_token_logits


class StepTimer(Callback):
    """Wall time and loss positions of each training step after the first (warm-up)."""

    def __init__(self):
        self.times, self.tokens = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx > 0:
            self.times.append(time.perf_counter() - self._t)
            self.tokens.append(int((batch["loss_mask"][:, 1:] & batch["attention_mask"][:, 1:].bool()).sum()))


def trainer_tokens_per_s(target, tokenizer, datamodule, steps: int) -> float:
    module = DraftDistillationModule(target=target, draft=build_draft(target, num_layers=4), tokenizer=tokenizer)
    timer = StepTimer()
    Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, limit_val_batches=0, callbacks=[timer]).fit(module, datamodule=datamodule)
    return sum(timer.tokens) / sum(timer.times)


def plain_loop_tokens_per_s(target, datamodule, steps: int) -> float:
    draft = build_draft(target, num_layers=4).train()
    draft.get_input_embeddings().requires_grad_(False)
    opt = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=5e-4)
    times, tokens = [], []
    for i, batch in enumerate(datamodule.train_dataloader()):
        if i == steps:
            break
        t = time.perf_counter()
        ids, attn = batch["input_ids"], batch["attention_mask"]
        select = batch["loss_mask"][:, 1:] & attn[:, 1:].bool()
        with torch.no_grad():
            teacher = next_token_logits(target, ids, attn, select)
        loss = distill_loss(next_token_logits(draft, ids, attn, select), teacher, "fkl")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i > 0:
            times.append(time.perf_counter() - t)
            tokens.append(int(select.sum()))
    return sum(tokens) / sum(times)


def synthetic_chat_file(path, n: int = 256, seed: int = 0) -> str:
    """Prompt/response records of realistic length (~50 + ~130 tokens) from the shipped prompts."""
    import json
    import random

    from lightning_spec.data import builtin_prompts_path

    prompts = [json.loads(line)["prompt"] for line in builtin_prompts_path().read_text().splitlines()]
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": rng.choice(prompts), "response": " ".join(rng.sample(prompts, 6))}) + "\n")
    return str(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--topk", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    target, tokenizer = load_causal_lm(args.target)
    target.eval().requires_grad_(False)
    with tempfile.TemporaryDirectory() as tmp:
        data = synthetic_chat_file(Path(tmp) / "chat.jsonl", n=args.steps * args.batch_size + 1)

        def datamodule(topk):
            dm = DistillDataModule(train_files=data, source="fixed", val_size=1, batch_size=args.batch_size,
                                   teacher_topk=topk, tokenizer=tokenizer, target=target, cache_dir=tmp)
            dm.prepare_data()
            dm.setup("fit")
            return dm

        online, offline = datamodule(None), datamodule(args.topk)
        runs = {"plain loop": [], "Trainer online": [], "Trainer offline": []}
        for _ in range(args.repeats):
            runs["plain loop"].append(plain_loop_tokens_per_s(target, online, args.steps))
            runs["Trainer online"].append(trainer_tokens_per_s(target, tokenizer, online, args.steps))
            runs["Trainer offline"].append(trainer_tokens_per_s(target, tokenizer, offline, args.steps))
    med = {k: statistics.median(v) for k, v in runs.items()}
    print(f"\ndistillation throughput, {args.target} target, 4-layer draft, batch {args.batch_size}, "
          f"median of {args.repeats} x {args.steps - 1} timed steps, {torch.get_num_threads()} threads")
    print(f"{'run':<18}{'loss tokens/s':>14}{'ratio':>10}  baseline")
    print(f"{'plain loop':<18}{med['plain loop']:>14.0f}{1.0:>10.2f}  -")
    print(f"{'Trainer online':<18}{med['Trainer online']:>14.0f}{med['Trainer online'] / med['plain loop']:>10.2f}  plain loop (goal >= 0.9)")
    print(f"{'Trainer offline':<18}{med['Trainer offline']:>14.0f}{med['Trainer offline'] / med['Trainer online']:>10.2f}  Trainer online (goal >= 1.8)")
    print(f"offline teacher storage: {args.topk * 8} bytes per token (top-{args.topk} int32 ids + float32 log-probs)")


if __name__ == "__main__":
    main()
