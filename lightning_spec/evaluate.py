"""`lightning-spec eval`: compare drafts for one target with real speculative decoding and write a report.

For each draft, on a prompt set: fidelity of its next-token distributions on the target's own greedy
continuations (alpha, greedy / top-5 agreement, KL both ways), then the engine at each gamma (and a tree), one
prompt at a time, against `target_generate` on the same prompts: tokens/s, tau, per-position acceptance, the
measured cost ratio c, and the measured speedup beside the one the formula predicts from alpha, gamma and c.
Writes ``report.md``, ``metrics.json`` and PNG plots into ``--out``.

Example::

    lightning-spec eval --target smollm2-135m-instruct \\
        --drafts untrained=cut:0,1,2,3 fkl=artifacts/smollm2_draft --gammas 1 2 4 --tree 2 2 1 --out artifacts/eval
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from tqdm.auto import tqdm

from lightning_spec.data import prompt_ids, read_records, record_kind
from lightning_spec.decoding import DecodingStats, speculative_generate, target_generate, topk_tree, use_small_batch_linear
from lightning_spec.metrics import (
    AcceptanceRate, KLDivergence, MeanAcceptedLength, PositionalAcceptance, TokenAgreement, TopKAgreement,
)
from lightning_spec.metrics import functional as F
from lightning_spec.models import build_draft, load_causal_lm, load_model, shared_vocabulary


def parse_drafts(specs: Sequence[str]) -> Dict[str, str]:
    """``name=source`` pairs; source is a model (HF directory, GGUF, embedded name) or ``cut:0,1,2,3`` (untrained
    layers of the target)."""
    drafts = {}
    for spec in specs:
        name, sep, source = spec.partition("=")
        if not sep or not name or not source:
            raise ValueError(f"--drafts takes name=source pairs (e.g. fkl=artifacts/smollm2_draft or untrained=cut:0,1,2,3), got {spec!r}")
        if name in drafts:
            raise ValueError(f"--drafts: the name {name!r} is given twice")
        drafts[name] = source
    if not drafts:
        raise ValueError("--drafts: give at least one draft")
    return drafts


def load_draft(source: str, target):
    if source.startswith("cut:"):
        try:
            layers = [int(x) for x in source[4:].split(",")]
        except ValueError as err:
            raise ValueError(f"draft source {source!r}: cut: takes comma-separated layer indices") from err
        return build_draft(target, layers=layers)
    return load_model(source)


def load_prompts(tokenizer, source: str, num_prompts: int) -> List[torch.Tensor]:
    records = read_records(source)
    if len(records) == 0:
        raise ValueError(f"prompt set {source} is empty")
    kind = record_kind(records.column_names)
    count = min(num_prompts, len(records))
    if kind == "text":
        return [torch.tensor([tokenizer(records[i]["text"])["input_ids"]]) for i in range(count)]
    return [torch.tensor([prompt_ids(tokenizer, records[i], kind)]) for i in range(count)]


@torch.no_grad()
def fidelity(target, draft, sequences: List[torch.Tensor], prompt_lengths: List[int]) -> Dict[str, float]:
    """Distribution metrics on the generated positions of the target's own continuations."""
    metrics = {
        "alpha": AcceptanceRate(), "agreement": TokenAgreement(), "top5_agreement": TopKAgreement(k=5),
        "kl_forward": KLDivergence("forward"), "kl_reverse": KLDivergence("reverse"),
    }
    vocab = shared_vocabulary(draft, target)  # padded embeddings past it score no token
    for seq, start in zip(sequences, prompt_lengths):
        t_logits, d_logits = target(seq).logits[0, start - 1 : -1, :vocab], draft(seq).logits[0, start - 1 : -1, :vocab]
        for metric in metrics.values():
            metric.update(d_logits, t_logits)
    return {name: float(m.compute()) for name, m in metrics.items()}


def run_engine(fn, prompts, max_new_tokens, progress, **kwargs):
    outputs, stats, seconds, tokens = [], [], 0.0, 0
    for ids in prompts:
        start = time.perf_counter()
        out = fn(input_ids=ids, max_new_tokens=max_new_tokens, **kwargs)
        seconds += time.perf_counter() - start
        tokens += out.tokens.shape[1] - ids.shape[1]
        outputs.append(out.tokens)
        stats.append(out.stats)
        progress.update(1)
    return outputs, stats, tokens / seconds


def evaluate(target_source: str, drafts: Dict[str, str], prompts: str = "builtin:prompts", num_prompts: int = 8,
             gammas: Sequence[int] = (1, 2, 4), tree: Optional[Sequence[int]] = (2, 2, 1), max_new_tokens: int = 48,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, out: str = "artifacts/eval",
             stock_linear: bool = False) -> dict:
    """Run the comparison and write the report; returns what metrics.json holds. Target and drafts decode on
    SmallBatchLinear (the CPU kernel for decode and verification batches) unless ``stock_linear``."""
    if not gammas or any(not isinstance(g, int) or g < 1 for g in gammas):
        raise ValueError(f"gammas must be integers >= 1, got {list(gammas)}")
    target, tokenizer = load_causal_lm(target_source)
    models = {name: load_draft(source, target).eval() for name, source in drafts.items()}
    for name, draft in models.items():
        try:
            shared_vocabulary(draft, target)
        except ValueError as err:
            raise ValueError(f"draft {name!r}: {err}") from err
    if not stock_linear:
        for model in (target, *models.values()):
            use_small_batch_linear(model)
    prompt_set = load_prompts(tokenizer, prompts, num_prompts)
    shapes = {f"gamma={g}": dict(gamma=g) for g in gammas}
    if tree:
        shapes[f"tree {list(tree)}"] = dict(tree=topk_tree(list(tree)))
    sampling = dict(temperature=temperature, top_p=top_p)
    total = len(prompt_set) * (1 + len(models) * len(shapes))
    progress = tqdm(total=total, desc="eval (prompt runs)", unit="run")
    generator = torch.Generator().manual_seed(seed)
    outputs, base_stats, base_rate = run_engine(lambda **kw: target_generate(target, generator=generator, **kw, **sampling), prompt_set, max_new_tokens, progress)
    baseline = DecodingStats.combine(base_stats)
    step_seconds = baseline.target_time / baseline.target_calls
    report = {
        "target": target_source, "prompts": prompts, "num_prompts": len(prompt_set), "max_new_tokens": max_new_tokens,
        "temperature": temperature, "top_p": top_p, "threads": torch.get_num_threads(), "linear": "nn.Linear" if stock_linear else "SmallBatchLinear",
        "target_tokens_per_s": base_rate, "drafts": {},
    }
    lengths = [p.shape[1] for p in prompt_set]
    for name, draft in models.items():
        entry = {"source": drafts[name], "fidelity": fidelity(target, draft, outputs, lengths), "runs": {}}
        for label, shape in shapes.items():
            run = lambda **kw: speculative_generate(target, draft, generator=generator, **kw, **shape, **sampling)  # noqa: E731
            _, stats, rate = run_engine(run, prompt_set, max_new_tokens, progress)
            depth = stats[0].max_depth
            positional, tau = PositionalAcceptance(gamma=depth), MeanAcceptedLength()
            positional.update(stats)
            tau.update(stats)
            total = DecodingStats.combine(stats)
            alpha, c = total.alpha, total.cost_ratio
            verify_seconds = total.target_time / total.target_calls
            entry["runs"][label] = {
                "depth": depth, "tokens_per_s": rate, "speedup": rate / base_rate, "tau": float(tau.compute()), "alpha": alpha,
                "accept_at": positional.compute().reshape(-1).tolist(), "cost_ratio": c,
                "verify_cost": verify_seconds / step_seconds,
                "predicted_speedup": F.expected_speedup(alpha, depth, c) if "gamma" in label else None,
            }
        chain_runs = [r for label, r in entry["runs"].items() if label.startswith("gamma")]
        entry["best_gamma"] = F.optimal_gamma(chain_runs[-1]["alpha"], chain_runs[-1]["cost_ratio"])
        report["drafts"][name] = entry
    progress.close()
    write_report(report, Path(out))
    return report


def _markdown(report: dict) -> str:
    lines = [
        f"# Speculative decoding report: {report['target']}",
        "",
        f"{report['num_prompts']} prompts from `{report['prompts']}`, {report['max_new_tokens']} new tokens each, batch 1, "
        f"temperature {report['temperature']}, top-p {report['top_p']}, {report['threads']} CPU threads, {report['linear']}. "
        f"Baseline `target_generate`: {report['target_tokens_per_s']:.1f} tokens/s.",
        "",
        "## Fidelity on the target's continuations",
        "",
        "| draft | alpha | greedy agreement | top-5 agreement | KL(p‖q) | KL(q‖p) |",
        "|---|---|---|---|---|---|",
    ]
    for name, d in report["drafts"].items():
        f = d["fidelity"]
        lines.append(f"| {name} | {f['alpha']:.3f} | {f['agreement']:.3f} | {f['top5_agreement']:.3f} | {f['kl_forward']:.3f} | {f['kl_reverse']:.3f} |")
    lines += ["", "## Speculative decoding", "",
              "c is a draft forward over a verification forward; a verification forward costs `verify` target decode steps "
              "(the formula assumes 1), so the formula's prediction over `verify` is what the measured speedup should be.",
              "",
              "| draft | run | tokens/s | speedup | predicted | verify | tau | alpha | c | acceptance per position |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name, d in report["drafts"].items():
        for label, r in d["runs"].items():
            predicted = f"{r['predicted_speedup']:.2f}" if r["predicted_speedup"] is not None else "-"
            accept = " ".join(f"{a:.2f}" for a in r["accept_at"])
            lines.append(f"| {name} | {label} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}x | {predicted} | {r['verify_cost']:.2f} | {r['tau']:.2f} | "
                         f"{r['alpha']:.3f} | {r['cost_ratio']:.3f} | {accept} |")
    lines += ["", "Recommended gamma (maximizes the predicted speedup from alpha and c): "
              + ", ".join(f"{name} {d['best_gamma']}" for name, d in report["drafts"].items()), "",
              "![acceptance per position](acceptance_per_position.png)", "![tau and speedup vs gamma](gamma_sweep.png)",
              "![measured vs predicted speedup](measured_vs_predicted.png)", ""]
    return "\n".join(lines)


def write_report(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(_markdown(report))
    drafts = report["drafts"]

    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / len(drafts)
    for i, (name, d) in enumerate(drafts.items()):
        longest = max((r for label, r in d["runs"].items() if label.startswith("gamma")), key=lambda r: r["depth"])
        xs = [k + 1 + (i - (len(drafts) - 1) / 2) * width for k in range(longest["depth"])]
        ax.bar(xs, [0 if a != a else a for a in longest["accept_at"]], width=width, label=name)
    ax.set(xlabel="draft position", ylabel="P(accepted | verified)", ylim=(0, 1), title="Acceptance per position")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "acceptance_per_position.png", dpi=110)
    plt.close(fig)

    fig, (ax_tau, ax_speed) = plt.subplots(1, 2, figsize=(10, 4))
    for name, d in drafts.items():
        runs = [r for label, r in d["runs"].items() if label.startswith("gamma")]
        gs = [r["depth"] for r in runs]
        ax_tau.plot(gs, [r["tau"] for r in runs], marker="o", label=name)
        line, = ax_speed.plot(gs, [r["speedup"] for r in runs], marker="o", label=f"{name} measured")
        ax_speed.plot(gs, [r["predicted_speedup"] for r in runs], linestyle="--", color=line.get_color(), label=f"{name} predicted")
    ax_tau.set(xlabel="gamma", ylabel="tau (tokens per target call)", title="tau vs gamma")
    ax_speed.axhline(1.0, color="grey", linewidth=0.8)
    ax_speed.set(xlabel="gamma", ylabel="speedup over target_generate", title="speedup vs gamma")
    ax_tau.legend()
    ax_speed.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "gamma_sweep.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 5))
    points = [(r["predicted_speedup"], r["speedup"], name) for name, d in drafts.items() for r in d["runs"].values() if r["predicted_speedup"] is not None]
    for name in drafts:
        ax.scatter([p for p, m, n in points if n == name], [m for p, m, n in points if n == name], label=name)
    top = max([1.0] + [max(p, m) for p, m, _ in points]) * 1.1
    ax.plot([0, top], [0, top], color="grey", linewidth=0.8)
    ax.set(xlabel="predicted speedup", ylabel="measured speedup", xlim=(0, top), ylim=(0, top), title="Measured vs predicted")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "measured_vs_predicted.png", dpi=110)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="lightning-spec eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="smollm2-135m-instruct")
    parser.add_argument("--drafts", nargs="+", required=True, help="name=source pairs; source: model path/name or cut:0,1,2,3")
    parser.add_argument("--prompts", default="builtin:prompts")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--gammas", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--tree", type=int, nargs="*", default=[2, 2, 1], help="top-k branching per depth; empty for none")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="artifacts/eval")
    parser.add_argument("--stock-linear", action="store_true", help="decode on nn.Linear instead of SmallBatchLinear")
    args = parser.parse_args(argv)
    try:
        report = evaluate(
            args.target, parse_drafts(args.drafts), args.prompts, args.num_prompts, args.gammas, args.tree or None,
            args.max_new_tokens, args.temperature, args.top_p, args.seed, args.out, args.stock_linear,
        )
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    print((Path(args.out) / "report.md").read_text())
    print(f"report written to {args.out}/ ({len(report['drafts'])} drafts)")
