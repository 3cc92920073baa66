"""Target sampling for `DistillDataModule(source="target")`: tokens/s of `generate_responses` with the target in
fp32 against a bf16 copy of it (`gen_dtype="bfloat16"`), both recording the top-64 offline teacher as the demo
does. Shapes are the demo's: SmolLM2-135M-Instruct, one batch of 160 of the package's prompts, T=0.7, up to 96
new tokens. Median of repeats, one run. bf16 only pays on CPUs with native bf16 (AVX-512 BF16 or AMX).

    python benchmarks/bench_generate.py [--repeats 3] [--prompts 160]
"""
import argparse
import copy
import json
import statistics
import time

import torch

from lightning_spec.data import builtin_prompts_path, generate_responses, prompt_ids
from lightning_spec.models import load_causal_lm


def tokens_per_second(model, tokenizer, prompts, repeats: int) -> float:
    rates = []
    for seed in range(repeats):
        start = time.perf_counter()
        out = generate_responses(model, tokenizer, prompts, max_new_tokens=96, temperature=0.7, top_p=1.0,
                                 batch_size=len(prompts), seed=seed, teacher_topk=64, desc="sampling")
        rates.append(sum(len(o["response"]) for o in out) / (time.perf_counter() - start))
    return statistics.median(rates)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=160)
    args = parser.parse_args()
    target, tokenizer = load_causal_lm("smollm2-135m-instruct")
    target.eval().requires_grad_(False)
    records = [json.loads(line) for line in builtin_prompts_path().read_text().splitlines()][: args.prompts]
    prompts = [prompt_ids(tokenizer, r, "prompt") for r in records]
    fp32 = tokens_per_second(target, tokenizer, prompts, args.repeats)
    bf16 = tokens_per_second(copy.deepcopy(target).to(torch.bfloat16), tokenizer, prompts, args.repeats)
    print(f"\n{'target sampling (B=' + str(len(prompts)) + ')':<28}{'tokens/s':>10}{'vs fp32':>10}")
    print("-" * 48)
    for name, rate in (("fp32 (baseline)", fp32), ("bf16 copy (gen_dtype)", bf16)):
        print(f"{name:<28}{rate:>10.0f}{rate / fp32:>9.2f}x")


if __name__ == "__main__":
    main()
