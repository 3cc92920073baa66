"""How much of post-training quantization's loss QAT recovers, on the distilled SmolLM2 draft or on SmolLM2 itself.

``--model draft``: from the same fp draft (``make demo``'s export, or the target's first 4 layers), the same
distillation steps run three ways on the demo's target-generated data: in full precision (fp), and with a
QATScheduler per scheme (QAT; the fp target teaches the quantized draft). PTQ is quantize_model on the fp run's
result; QAT is convert() on the QAT run's.
``--model target``: QAT of the target for low-precision serving. fp is the target itself (α = 1 by definition);
PTQ quantizes it; QAT self-distills it (the fp target teaches its own fake-quantized copy). A short fp run of the
same module gives the step time QAT is compared with.

Each model is scored on the held-out split against the fp target: α (mean Σ min(p, q)), greedy agreement, and
perplexity on the held-out text. Recovery = (QAT - PTQ) / (fp - PTQ) in α and in perplexity (goal ≥ 70%;
torchao: 68-96%). Step time of QAT over fp is the median over the run's steps (goal ≤ 1.3x).

    python benchmarks/bench_qat.py [--model draft|target] [--steps 60] [--lr 2e-4] [--draft artifacts/smollm2_draft] [--learn-scales]
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


def start_draft(path: str, target):
    return load_model(path) if Path(path).is_dir() else build_draft(target, layers=[0, 1, 2, 3])


def train(draft, target, tokenizer, datamodule, steps: int, lr: float, qat=None):
    seed_everything(0, verbose=False)
    module = DraftDistillationModule(target=target, draft=draft, tokenizer=tokenizer, loss="fkl",
                                     optimizer=partial(torch.optim.AdamW, lr=lr, weight_decay=0.0))
    timer = StepTimer()
    Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer] + ([qat] if qat else [])).fit(module, datamodule=datamodule)
    return module.draft.eval(), statistics.median(timer.times)


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
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=None, help="default: 2e-4 for the draft, 2e-5 for the target")
    parser.add_argument("--draft", default="artifacts/smollm2_draft", help="fp draft to start from (else the target's layers 0-3)")
    parser.add_argument("--learn-scales", action="store_true", help="also run QAT with learned (LSQ) scales")
    args = parser.parse_args()
    torch.manual_seed(0)

    target, tokenizer = load_causal_lm("smollm2-135m-instruct")
    datamodule = DistillDataModule(**DEMO_DATA, tokenizer=tokenizer, target=target)
    datamodule.prepare_data()
    datamodule.setup("fit")
    held_out = HeldOut(target, datamodule.val_dataloader())
    args.lr = args.lr or (2e-4 if args.model == "draft" else 2e-5)
    if args.model == "draft":
        start = start_draft(args.draft, target)
        print(f"start: {args.draft if Path(args.draft).is_dir() else 'cut of layers 0-3'}; {args.steps} steps of fkl distillation at lr {args.lr}")
        fp_model, fp_step = train(copy.deepcopy(start), target, tokenizer, datamodule, args.steps, args.lr)
    else:
        start = copy.deepcopy(target)
        print(f"start: the target; {args.steps} steps of fkl self-distillation at lr {args.lr}")
        fp_model, (_, fp_step) = target, train(copy.deepcopy(start), target, tokenizer, datamodule, min(args.steps, 10), args.lr)
    rows = [("fp", "-", held_out.score(fp_model), 1.0)]
    variants = [("QAT", False)] + ([("QAT+LSQ", True)] if args.learn_scales else [])
    summary = []
    for label, weight, group, activation in SCHEMES:
        ptq = copy.deepcopy(fp_model)
        quantize_model(ptq, weight, group, activation=activation)
        ptq_score = held_out.score(ptq)
        rows.append((label, "PTQ", ptq_score, float("nan")))
        for name, learn in variants:
            qat = QATScheduler(weight=weight, group_size=group, activation=activation, learn_scales=learn,
                               scale_lr=args.lr if learn else None)
            qat_draft, qat_step = train(copy.deepcopy(start), target, tokenizer, datamodule, args.steps, args.lr, qat)
            convert(qat_draft)
            score = held_out.score(qat_draft)
            rows.append((label, name, score, qat_step / fp_step))
            summary.append((label, name, recovery(rows[0][2]["alpha"], ptq_score["alpha"], score["alpha"]),
                            recovery(rows[0][2]["ppl"], ptq_score["ppl"], score["ppl"]), qat_step / fp_step))

    print(f"\nheld-out: {sum(int(s.sum()) for *_, s, _ in held_out.batches)} tokens of target-generated text; fp step {fp_step:.2f} s")
    print("\n| scheme | model | α | agreement | perplexity | step time / fp |\n|---|---|---|---|---|---|")
    for scheme, kind, s, ratio in rows:
        print(f"| {scheme} | {kind} | {s['alpha']:.4f} | {s['agreement']:.4f} | {s['ppl']:.3f} | {'' if math.isnan(ratio) else f'{ratio:.2f}x'} |")
    print("\n| scheme | model | α recovered | perplexity recovered | step time / fp |\n|---|---|---|---|---|")
    for scheme, name, a, p, ratio in summary:
        print(f"| {scheme} | {name} | {a:.0%} | {p:.0%} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
