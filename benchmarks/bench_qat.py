"""How much of post-training quantization's loss QAT recovers, on the distilled SmolLM2 draft or on SmolLM2 itself.

fp is the model as given: ``--model draft`` the distilled draft (``make demo``'s export, or else the target's first
4 layers), ``--model target`` SmolLM2 itself. PTQ is quantize_model on it. QAT is the usual recipe for a trained
model (LLM-QAT, torchao): the fp model teaches its own fake-quantized copy (forward KL on the full vocabulary, the
teacher run online) on the demo's target-generated training text, for ``--steps`` steps of AdamW whose lr decays
to 0 on a cosine, under a QATScheduler whose scales follow the weights for the first half and are frozen for the
second; convert() then gives the QuantizedLinear model that is scored. ``--learn-scales`` adds a run with learned
(LSQ) scales.

Each model is scored on the held-out split against the fp target: α (mean Σ min(p, q)), greedy agreement, and
perplexity on the held-out text. Recovery = (QAT - PTQ) / (fp - PTQ) in α and in perplexity (goal ≥ 70%;
torchao: 68-96%). Step time: QAT's over the same training without QATScheduler, median over the same batches
(goal ≤ 1.3x).

    python benchmarks/bench_qat.py [--model draft|target] [--steps 240] [--lr 1e-4] [--draft artifacts/smollm2_draft] [--learn-scales]
"""
from __future__ import annotations

import argparse
import copy
import math
import statistics
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from lightning import Trainer, seed_everything

from bench_distill import StepTimer  # benchmarks run as scripts from this folder
from lightning_spec import DistillDataModule, DraftDistillationModule, QATScheduler, load_causal_lm
from lightning_spec.losses import fidelity_sums
from lightning_spec.models import build_draft, load_model, next_token_logits
from lightning_spec.quant import convert, quantize_model

# the demo's data, read from its config so that its on-disk cache is reused
DEMO_DATA = yaml.safe_load((Path(__file__).parents[1] / "examples" / "smollm2_draft.yaml").read_text())["data"]["init_args"]
# (label, weight, group_size, activation): int4 g32 weight-only, and int8 dynamic activations + int4 weights
SCHEMES = [("int4 g32", "int4", 32, None), ("8da4w g32", "int4", 32, "int8")]
TIMED_STEPS = 20  # the fp run that QAT's step time is compared with


def start_draft(path: str, target):
    return load_model(path) if Path(path).is_dir() else build_draft(target, layers=[0, 1, 2, 3])


def self_distill(fp_model, tokenizer, datamodule, steps: int, lr: float, qat=None):
    """A copy of ``fp_model`` trained for ``steps`` steps with ``fp_model`` as its teacher; returns it and its step times."""
    seed_everything(0, verbose=False)
    module = DraftDistillationModule(target=copy.deepcopy(fp_model), draft=copy.deepcopy(fp_model), tokenizer=tokenizer, loss="fkl",
                                     optimizer=partial(torch.optim.AdamW, lr=lr, weight_decay=0.0),
                                     lr_scheduler=partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=steps))
    timer = StepTimer()
    Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer] + ([qat] if qat else [])).fit(module, datamodule=datamodule)
    return module.draft.eval(), timer.times


class HeldOut:
    """The held-out split with the fp target's logits at its loss positions, computed once."""

    @torch.no_grad()
    def __init__(self, target, loader):
        self.batches = []
        for batch in loader:
            ids, attn = batch["input_ids"], batch["attention_mask"]
            select = batch["loss_mask"][:, 1:] & attn[:, 1:].bool()
            self.batches.append((ids, attn, select, next_token_logits(target, ids, attn, select).float()))

    @torch.no_grad()
    def score(self, draft):
        alpha = agree = nll = count = 0.0
        for ids, attn, select, target_logits in self.batches:
            logits = next_token_logits(draft, ids, attn, select).float()
            a, g, n = fidelity_sums(logits, target_logits)
            alpha, agree, count = alpha + a.item(), agree + g.item(), count + n.item()
            nll += F.cross_entropy(logits, ids[:, 1:][select], reduction="sum").item()
        return {"alpha": alpha / count, "agreement": agree / count, "ppl": math.exp(nll / count)}


def recovery(fp: float, ptq: float, qat: float) -> float:
    return (qat - ptq) / (fp - ptq) if fp != ptq else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("draft", "target"), default="draft", help="what is quantized")
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--lr", type=float, default=1e-4, help="peak lr of the cosine")
    parser.add_argument("--draft", default="artifacts/smollm2_draft", help="fp draft (else the target's layers 0-3)")
    parser.add_argument("--learn-scales", action="store_true", help="also run QAT with learned (LSQ) scales, at lr / 10")
    args = parser.parse_args()
    torch.manual_seed(0)

    target, tokenizer = load_causal_lm("smollm2-135m-instruct")
    datamodule = DistillDataModule(**DEMO_DATA, tokenizer=tokenizer, target=target)
    datamodule.prepare_data()
    datamodule.setup("fit")
    # the demo's recorded teacher is the target's top-64; here the teacher is the fp model itself, run online
    train_split = datamodule.splits["train"]
    datamodule.splits["train"] = train_split.remove_columns([c for c in ("teacher_indices", "teacher_logprobs") if c in train_split.column_names])
    held_out = HeldOut(target, datamodule.val_dataloader())
    fp_model = start_draft(args.draft, target) if args.model == "draft" else target
    what = (args.draft if Path(args.draft).is_dir() else "cut of layers 0-3") if args.model == "draft" else "the target"
    print(f"fp: {what}; QAT: {args.steps} steps of fkl self-distillation, lr {args.lr} on a cosine, scales frozen at step {args.steps // 2}")
    _, fp_times = self_distill(fp_model, tokenizer, datamodule, min(args.steps, TIMED_STEPS), args.lr)
    rows = [("fp", "-", held_out.score(fp_model), 1.0)]
    variants = [("QAT", False)] + ([("QAT+LSQ", True)] if args.learn_scales else [])
    summary = []
    for label, weight, group, activation in SCHEMES:
        ptq = copy.deepcopy(fp_model)
        quantize_model(ptq, weight, group, activation=activation)
        ptq_score = held_out.score(ptq)
        rows.append((label, "PTQ", ptq_score, float("nan")))
        for name, learn in variants:
            # learned scales are frozen statistics from the start (the optimizer moves them); observed ones follow
            # the weights for the first half, then hold still while the weights settle on the grid
            qat = QATScheduler(weight=weight, group_size=group, activation=activation, learn_scales=learn,
                               freeze_step=None if learn else args.steps // 2, scale_lr=args.lr / 10 if learn else None)
            qat_model, qat_times = self_distill(fp_model, tokenizer, datamodule, args.steps, args.lr, qat)
            convert(qat_model)
            score = held_out.score(qat_model)
            ratio = statistics.median(qat_times[: len(fp_times)]) / statistics.median(fp_times)
            rows.append((label, name, score, ratio))
            summary.append((label, name, recovery(rows[0][2]["alpha"], ptq_score["alpha"], score["alpha"]),
                            recovery(rows[0][2]["ppl"], ptq_score["ppl"], score["ppl"]), ratio))

    print(f"\nheld-out: {sum(int(s.sum()) for *_, s, _ in held_out.batches)} tokens of target-generated text; "
          f"fp step {statistics.median(fp_times):.2f} s")
    print("\n| scheme | model | α | agreement | perplexity | step time / fp |\n|---|---|---|---|---|---|")
    for scheme, kind, s, ratio in rows:
        print(f"| {scheme} | {kind} | {s['alpha']:.4f} | {s['agreement']:.4f} | {s['ppl']:.3f} | {'' if math.isnan(ratio) else f'{ratio:.2f}x'} |")
    print("\n| scheme | model | α recovered | perplexity recovered | step time / fp |\n|---|---|---|---|---|")
    for scheme, name, a, p, ratio in summary:
        print(f"| {scheme} | {name} | {a:.0%} | {p:.0%} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
