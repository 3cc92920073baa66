"""End-to-end speculative decoding on the embedded target with the demo's distilled draft, greedy, batch 1.

Baselines, all in one run on the same prompts (held-out prompts of the demo): `target_generate` (the target alone
in the same engine) and transformers' assisted generation (`generate(assistant_model=draft)`, constant schedule,
the same gamma, confidence early-exit off). Also printed: alpha (pooled per-position acceptance), tau (tokens per
target call), the cost ratio c (draft decode step / target decode step, both measured alone) and the speedup
Leviathan et al.'s formula predicts from them, (1 - a^(g+1)) / ((1 - a)(g c + 1)), beside the measured one.
Each repeat runs every configuration prompt by prompt (they share the host's drifts); tokens/s are the median
over repeats, ratios the median of each repeat's ratios; tokens/s include the prompt's prefill.

    make demo   # exports artifacts/smollm2_draft
    python benchmarks/bench_speculative.py [--draft artifacts/smollm2_draft] [--gammas 1 2 3] [--trees 4 2,2,1]
        [--draft-scheme int8|int4] [--stock-linear]

Both models run on SmallBatchLinear (use_small_batch_linear) in every run unless --stock-linear; --draft-scheme
quantizes the draft, head included, with quantize_model. "HF stock" is assisted generation on the pair exactly as
transformers loads it (fp32 nn.Linear in both models), the way a user without lightning-spec would run it: "vs HF"
compares the engines on the same modules, "vs stock" what the package as a whole gives.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from lightning_spec import load_causal_lm
from lightning_spec.data import prompt_ids, read_records, record_kind
from lightning_spec.quant import quantize_model
from lightning_spec.decoding import DecodingStats, speculative_generate, target_generate, topk_tree, use_small_batch_linear


def held_out_prompts(tokenizer, n: int, val_size: int = 40, seed: int = 0):
    """The first n prompts of the demo's held-out split (DistillDataModule's train_test_split with its seed)."""
    records = read_records("builtin:prompts").train_test_split(test_size=val_size, seed=seed, shuffle=True)["test"]
    kind = record_kind(records.column_names)
    return [torch.tensor([prompt_ids(tokenizer, records[i], kind)]) for i in range(n)]


def hf_assisted(target, draft, gamma):
    config = draft.generation_config
    config.num_assistant_tokens, config.num_assistant_tokens_schedule, config.assistant_confidence_threshold = gamma, "constant", 0.0

    def run(ids, max_new_tokens):
        out = target.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), assistant_model=draft, do_sample=False,
            max_new_tokens=max_new_tokens, pad_token_id=target.generation_config.eos_token_id,
        )
        return out, None

    return run


def timed(run, prompts, max_new_tokens):
    """(new tokens, seconds, outputs, engine stats) over all prompts, one at a time."""
    tokens, seconds, outputs, stats = 0, 0.0, [], []
    for ids in prompts:
        start = time.perf_counter()
        out, st = run(ids, max_new_tokens)
        seconds += time.perf_counter() - start
        tokens += out.shape[1] - ids.shape[1]
        outputs.append(out)
        stats.append(st)
    return tokens, seconds, outputs, stats


def engine(fn, *models, **kwargs):
    def run(ids, max_new_tokens):
        out = fn(*models, ids, max_new_tokens, **kwargs)
        return out.tokens, out.stats

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="smollm2-135m-instruct")
    parser.add_argument("--draft", default="artifacts/smollm2_draft")
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--gammas", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--trees", nargs="*", default=["4", "2,2,1"], help="static trees, each its top-k branching per depth (e.g. 2,2,1)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--draft-scheme", choices=["int8", "int4"], help="quantize the draft (head included) with quantize_model")
    parser.add_argument("--stock-linear", action="store_true", help="keep nn.Linear (default: SmallBatchLinear in both models, for every run)")
    args = parser.parse_args()

    target, tokenizer = load_causal_lm(args.target)
    draft, _ = load_causal_lm(args.draft)
    target.eval(), draft.eval()
    if args.draft_scheme:
        quantize_model(draft, args.draft_scheme, 32 if args.draft_scheme.startswith("int4") else None, exclude=())
    if not args.stock_linear:
        use_small_batch_linear(target), use_small_batch_linear(draft)
    stock_target, _ = load_causal_lm(args.target)
    stock_draft, _ = load_causal_lm(args.draft)
    stock_target.eval(), stock_draft.eval()
    prompts = held_out_prompts(tokenizer, args.prompts)
    runs = {"target_generate": engine(target_generate, target), "draft alone": engine(target_generate, draft)}
    for g in args.gammas:
        runs[f"speculative g={g}"] = engine(speculative_generate, target, draft, gamma=g)
        runs[f"HF assisted g={g}"] = hf_assisted(target, draft, g)
        runs[f"HF stock g={g}"] = hf_assisted(stock_target, stock_draft, g)
    for tree in args.trees:
        branching = [int(k) for k in tree.split(",")]
        runs[f"speculative tree {branching}"] = engine(speculative_generate, target, draft, tree=topk_tree(branching))

    timed(runs["target_generate"], prompts[:1], 8)  # warm-up
    # Each repeat runs every configuration on one prompt before the next prompt, so that all of them share the
    # host's drifts (this one's speed moves by 10-30% over minutes); ratios are the median over repeats of the
    # ratios within a repeat.
    rates = {name: [] for name in runs}
    stats, outputs = {}, {}
    for _ in range(args.repeats):
        totals = {name: [0, 0.0, [], []] for name in runs}  # tokens, seconds, outputs, stats
        for ids in prompts:
            for name, run in runs.items():
                if name.startswith("HF"):
                    pair = (stock_target, stock_draft) if name.startswith("HF stock") else (target, draft)
                    hf_assisted(*pair, int(name.split("=")[1]))  # its gamma on the draft's generation config
                tokens, seconds, outs, st = timed(run, [ids], args.max_new_tokens)
                total = totals[name]
                total[0] += tokens
                total[1] += seconds
                total[2] += outs
                total[3] += st
        for name, (tokens, seconds, outs, st) in totals.items():
            rates[name].append(tokens / seconds)
            stats[name], outputs[name] = st, outs
    rate = {name: statistics.median(r) for name, r in rates.items()}
    ratio = lambda name, baseline: statistics.median(a / b for a, b in zip(rates[name], rates[baseline]))
    base = rate["target_generate"]
    c = 1 / ratio("draft alone", "target_generate")

    for name in runs:
        if name.startswith("speculative"):
            same = all(torch.equal(a, b) for a, b in zip(outputs[name], outputs["target_generate"]))
            assert same, f"{name}: greedy output differs from the target's"

    linear = "nn.Linear" if args.stock_linear else "SmallBatchLinear"
    print(f"\nspeculative decoding, {args.target} (fp32, {linear}) + draft {args.draft}, greedy, batch 1, {len(prompts)} held-out "
          f"prompts x {args.max_new_tokens} new tokens, {torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"cost ratio c = {c:.3f} (target {base:.1f} tok/s alone, draft {rate['draft alone']:.1f} tok/s alone)")
    header = f"{'run':<28}{'tok/s':>8}{'vs target':>11}{'vs HF':>8}{'vs stock':>10}{'alpha':>8}{'tau':>7}{'predicted':>11}"
    print(header)
    print(f"{'target_generate':<28}{base:>8.1f}{1.0:>11.2f}")
    for name in runs:
        if not name.startswith("speculative"):
            continue
        st = stats[name]
        accepts, attempts = sum(sum(s.position_accepts) for s in st), sum(sum(s.position_attempts) for s in st)
        alpha = accepts / attempts
        tau = DecodingStats.combine(st).tau
        line = f"{name:<28}{rate[name]:>8.1f}{ratio(name, 'target_generate'):>11.2f}"
        if "tree" in name:
            line += f"{'-':>8}{'-':>10}{alpha:>8.3f}{tau:>7.2f}{'-':>11}"
        else:
            g = int(name.split("=")[1])
            predicted = (1 - alpha ** (g + 1)) / ((1 - alpha) * (g * c + 1))
            line += (f"{ratio(name, f'HF assisted g={g}'):>8.2f}{ratio(name, f'HF stock g={g}'):>10.2f}{alpha:>8.3f}"
                     f"{tau:>7.2f}{predicted:>11.2f}")
        print(line)
    for prefix in ("HF assisted", "HF stock"):
        for g in args.gammas:
            name = f"{prefix} g={g}"
            print(f"{name:<28}{rate[name]:>8.1f}{ratio(name, 'target_generate'):>11.2f}")
    print("goals: speculative >= 1.3x target_generate, >= 2x HF assisted (same pair and gamma)")


if __name__ == "__main__":
    main()
