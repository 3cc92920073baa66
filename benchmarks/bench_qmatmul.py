"""quantized_linear (lightning_spec's CPU kernels) against fp32 / bf16 F.linear and torch's own int8/int4 CPU ops.

Baselines: fp32 `F.linear` (the ratio the goals are set on), bf16 `F.linear`, `torch._weight_int8pack_mm` and
`torch._weight_int4pack_mm_for_cpu` (group 32). Effective GB/s counts the packed weight bytes read once per call,
beside a measured copy bandwidth (a 256 MiB tensor copy: bytes read + written). Median of many runs (on the CPU, the
median of 5 rounds in which the calls take turns), ratios in one
run, on however many threads torch uses (2 on the build machine). On the CPU also w8a8 against fp32, a small
call's cost through quantized_linear against torch.ops, and M = 1 at 1536x576 with the weight hot in L2 and read
from L3 or memory (the main table's calls take turns, so there each weight is partly evicted). With --device cuda:
kernel times from CUDA graph replays (no Python or launch overhead), each call on its own copy of the operands, the
copies together four times the L2 cache, so the weights stream from device memory as in a model's forward.

    python benchmarks/bench_qmatmul.py [--repeats 50] [--m 1 8] [--draft artifacts/smollm2_draft] [--device cuda]

With --draft (default: the demo's export, when present), also end to end: greedy decoding of the 4-layer SmolLM2
draft in the engine (`target_generate` on the draft), fp32 against `quantize_model(..., exclude=())` (the tied
head quantized too): decode tokens/s (the prompt's prefill excluded; the goal is per decoded token), tokens/s of
the whole call, and greedy agreement: how often the quantized draft's argmax is the fp32 draft's token along the
fp32 draft's own output. With --compile, the same again with each model's forward under
torch.compile(dynamic=True) (its decoded tokens asserted equal to eager's), ratios against the compiled fp32 draft.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lightning_spec.decoding import target_generate
from lightning_spec.models import load_model, load_tokenizer
from lightning_spec.ops import quantized_linear
from lightning_spec.quant import quantize_model, quantize_weight
from lightning_spec.quant.numerics import quantize_codes

SHAPES = [(1536, 576), (4096, 4096), (49152, 576), (11008, 4096)]


def median_us(fn, repeats: int, device: str = "cpu") -> float:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def interleaved_us(calls: dict, repeats: int, rounds: int = 5) -> dict:
    """Median over `rounds` rounds of each call's median_us, the calls taking turns in every round, so that a slow
    spell of a shared machine lands on all of them rather than on whichever ran then."""
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            times[name].append(median_us(fn, repeats))
    return {name: statistics.median(t) for name, t in times.items()}


def cuda_graph_us(calls: list, repeats: int) -> float:
    """Median GPU time per call of `calls`, captured back to back in one CUDA graph and timed with events."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graph asks
        for call in calls[:3]:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    return statistics.median(times)


def copy_bandwidth_gbs(device: str = "cpu") -> float:
    src = torch.empty(64 * 1024 * 1024, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / median_us(lambda: dst.copy_(src), 10, device) / 1e3


def torch_int4_operands(w: torch.Tensor, group: int):
    """The same int4 g32 codes in torch's CPU int4 layout (codes 0..15, scale and a float zero per group); only
    timed, so the zero is left at 0."""
    q, scales, _ = quantize_codes(w, "int4", group)
    packed = torch._convert_weight_to_int4pack_for_cpu((q + 8).to(torch.int32), 1)
    s = scales.t().contiguous()  # [K/g, N]
    return packed, torch.stack([s, torch.zeros_like(s)], dim=-1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--m", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--draft", default="artifacts/smollm2_draft")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--compile", action="store_true", help="end to end also with torch.compile'd models (~2 min more)")
    args = parser.parse_args()
    dev = args.device
    where = torch.cuda.get_device_name() if dev == "cuda" else f"{torch.get_num_threads()} threads, kernels {torch.ops.lightning_spec.qmatmul_cpu_isa()}"
    timing = f"median of {args.repeats}" + (", median of 5 interleaved rounds" if dev == "cpu" else "")
    print(f"quantized_linear on {where}, copy bandwidth {copy_bandwidth_gbs(dev):.1f} GB/s, {timing}")
    print(f"{'M':>3} {'N x K':>12} {'fp32 us':>9} {'bf16 us':>9} {'int8 us':>9} {'int4 us':>9} "
          f"{'int8/fp32':>10} {'int4/fp32':>10} {'int8/bf16':>10} {'int4/bf16':>10} {'int8/torch':>11} {'int4/torch':>11} {'int8 GB/s':>10} {'int4 GB/s':>10}")
    torch.manual_seed(0)
    for M in args.m:
        for N, K in SHAPES:
            w, x = torch.randn(N, K) * 0.02, torch.randn(M, K)
            p8, s8, _ = quantize_weight(w, "int8")
            p4, s4, _ = quantize_weight(w, "int4", 32)
            if dev == "cuda":
                x, xb = x.cuda(), x.bfloat16().cuda()
                l2 = getattr(torch.cuda.get_device_properties(), "L2_cache_size", 64 << 20)
                copies = min(1024, max(8, math.ceil(4 * l2 / p4.numel())))
                ws = [w.cuda() for _ in range(copies)]
                wbs = [c.bfloat16() for c in ws]
                q8 = [(p8.cuda(), s8.cuda()) for _ in range(copies)]
                q4 = [(p4.cuda(), s4.cuda()) for _ in range(copies)]
                t = {
                    "fp32": cuda_graph_us([lambda c=c: F.linear(x, c) for c in ws], args.repeats),
                    "bf16": cuda_graph_us([lambda c=c: F.linear(xb, c) for c in wbs], args.repeats),
                    "int8": cuda_graph_us([lambda c=c: quantized_linear(x, *c, scheme="int8") for c in q8], args.repeats),
                    "int4": cuda_graph_us([lambda c=c: quantized_linear(x, *c, scheme="int4", group_size=32) for c in q4],
                                          args.repeats),
                }
                del ws, wbs, q8, q4
            else:
                wb, xb = w.bfloat16(), x.bfloat16()
                t = interleaved_us({
                    "fp32": lambda: F.linear(x, w),
                    "bf16": lambda: F.linear(xb, wb),
                    "int8": lambda: quantized_linear(x, p8, s8, scheme="int8"),
                    "int4": lambda: quantized_linear(x, p4, s4, scheme="int4", group_size=32),
                }, args.repeats)
            versus_torch = "            -           -"
            if dev == "cpu":  # torch's packed int8/int4 CPU ops
                tp4, tsz = torch_int4_operands(w, 32)
                torch8 = median_us(lambda: torch._weight_int8pack_mm(x, p8, s8), max(5, args.repeats // 5))
                torch4 = median_us(lambda: torch._weight_int4pack_mm_for_cpu(x, tp4, 32, tsz), max(5, args.repeats // 5))
                versus_torch = f"{torch8 / t['int8']:>10.1f}x {torch4 / t['int4']:>10.1f}x"
            bytes8 = p8.numel() + s8.numel() * 4
            bytes4 = p4.numel() + s4.numel() * 4
            print(f"{M:>3} {f'{N}x{K}':>12} {t['fp32']:>9.1f} {t['bf16']:>9.1f} {t['int8']:>9.1f} {t['int4']:>9.1f} "
                  f"{t['fp32'] / t['int8']:>9.2f}x {t['fp32'] / t['int4']:>9.2f}x {t['bf16'] / t['int8']:>9.2f}x {t['bf16'] / t['int4']:>9.2f}x "
                  f"{versus_torch} {bytes8 / t['int8'] / 1e3:>10.1f} {bytes4 / t['int4'] / 1e3:>10.1f}")
    print("goals at M=1: int8 >= 2.5x and int4 >= 4x fp32; both >= 5x torch's int8/int4 ops; at M=8: not slower than bf16")
    if dev == "cpu":
        w8a8_and_call_overhead(args.m, args.repeats)
        small_layer_hot_and_cold(args.repeats)
    if dev == "cpu" and args.draft and Path(args.draft).is_dir():
        end_to_end(args.draft, args.repeats, args.compile)


def w8a8_and_call_overhead(rows, repeats: int):
    """w8a8 (per-token int8 activations, quantized in the call) against fp32 `F.linear`, and what a call costs beside
    its kernel: `quantized_linear` (no gradient: the op's direct binding) against `torch.ops.lightning_spec.
    quantized_linear` (torch.ops' boxed call and the Python autograd kernel) on a 16x64 int8 layer."""
    print(f"\nw8a8 against fp32 F.linear, median of {repeats}, median of 5 interleaved rounds")
    print(f"{'M':>3} {'N x K':>12} {'fp32 us':>9} {'w8a8 us':>9} {'w8a8/fp32':>10}")
    for M in rows:
        for N, K in SHAPES:
            w, x = torch.randn(N, K) * 0.02, torch.randn(M, K)
            pw, sw, _ = quantize_weight(w, "w8a8")
            t = interleaved_us({"fp32": lambda: F.linear(x, w), "w8a8": lambda: quantized_linear(x, pw, sw, scheme="w8a8")}, repeats)
            print(f"{M:>3} {f'{N}x{K}':>12} {t['fp32']:>9.1f} {t['w8a8']:>9.1f} {t['fp32'] / t['w8a8']:>9.2f}x")
    p8, s8, _ = quantize_weight(torch.randn(16, 64), "int8")
    x = torch.randn(1, 64)
    t = interleaved_us({
        "binding": lambda: quantized_linear(x, p8, s8, scheme="int8"),
        "torch.ops": lambda: torch.ops.lightning_spec.quantized_linear(x, p8, s8, None, "int8", 0, None),
    }, 20 * repeats)
    print(f"a 16x64 int8 call: quantized_linear {t['binding']:.2f} us, torch.ops {t['torch.ops']:.2f} us "
          f"({t['torch.ops'] / t['binding']:.2f}x)")


def small_layer_hot_and_cold(repeats: int):
    """M = 1 at the smallest shape, whose fp32 weight (3.5 MB) fits two cores' L2 caches: each kernel on one weight
    (hot after its first call) and on copies that take turns, 19 of them (64 MB in fp32), so that each call reads its
    weight from L3 or memory, as the layers of a model's forward do."""
    N, K = SHAPES[0]
    x = torch.randn(1, K)
    kernels = {
        "fp32": (lambda w: w, lambda w: F.linear(x, w)),
        "int8": (lambda w: quantize_weight(w, "int8"), lambda q: quantized_linear(x, *q, scheme="int8")),
        "int4": (lambda w: quantize_weight(w, "int4", 32), lambda q: quantized_linear(x, *q, scheme="int4", group_size=32)),
    }
    weights = [torch.randn(N, K) * 0.02 for _ in range(64 * 2**20 // (4 * N * K) + 1)]
    calls = {}
    for name, (prepare, run) in kernels.items():
        operands = [prepare(w) for w in weights]
        turns = itertools.cycle(operands)
        calls[(name, "hot")] = lambda run=run, one=operands[0]: run(one)
        calls[(name, "cold")] = lambda run=run, turns=turns: run(next(turns))
    t = interleaved_us(calls, repeats)
    print(f"\nM = 1 at {N}x{K}: one weight (hot) against {len(weights)} copies taking turns (cold: out of L2), median of {repeats}, "
          "median of 5 interleaved rounds")
    print(f"{'weight':<10}{'fp32 us':>9}{'int8 us':>9}{'int4 us':>9}{'int8/fp32':>11}{'int4/fp32':>11}")
    for where in ("hot", "cold"):
        fp32, int8, int4 = (t[(name, where)] for name in kernels)
        print(f"{where:<10}{fp32:>9.1f}{int8:>9.1f}{int4:>9.1f}{fp32 / int8:>10.2f}x{fp32 / int4:>10.2f}x")


def end_to_end(draft_dir: str, repeats: int, compiled: bool, new_tokens: int = 48):
    draft = load_model(draft_dir).eval()
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    prompts = ["Explain photosynthesis in two sentences.", "Write a short poem about the sea.", "What is a prime number?"]
    ids = [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False),
                     return_tensors="pt")["input_ids"] for p in prompts]
    runs = max(5, repeats // 8)
    schemes = {"fp32": draft}
    for name, scheme, group in [("int8", "int8", None), ("int4 g32", "int4", 32)]:
        schemes[name] = copy.deepcopy(draft)
        quantize_model(schemes[name], scheme, group, exclude=())
    models = {("eager", name): model for name, model in schemes.items()}
    if compiled:
        # the three models share HF's forward code, and each prompt length and cache layout adds graphs to it
        torch._dynamo.config.recompile_limit = 64
        for name, model in schemes.items():
            model = models["compiled", name] = copy.deepcopy(model)
            model.forward = torch.compile(model.forward, dynamic=True)
            for i in ids:  # compiles every graph the timed rounds need
                target_generate(model, i, new_tokens, eos_token_id=[])
    # rounds interleave the models, so the machine's drifts hit them alike; a ratio (against fp32 run the same way)
    # is the median over rounds
    decode, call, outputs = ({key: [] for key in models} for _ in range(3))
    for _ in range(runs):
        for key, model in models.items():
            outs = [target_generate(model, i, new_tokens, eos_token_id=[]) for i in ids]
            tokens = sum(o.stats.new_tokens for o in outs)
            decode[key].append(tokens / sum(o.stats.wall_time - o.stats.prefill_time for o in outs))
            call[key].append(tokens / sum(o.stats.wall_time for o in outs))
            outputs[key] = [o.tokens for o in outs]
    print(f"\nend to end: {draft_dir} greedy decoding, {len(prompts)} prompts x {new_tokens} tokens, {runs} interleaved rounds")
    print(f"{'model':<22}{'decode tok/s':>13}{'vs fp32':>9}{'call tok/s':>11}{'vs fp32':>9}{'greedy agreement':>18}")
    ratio = lambda rates, key: statistics.median(r / b for r, b in zip(rates[key], rates[key[0], "fp32"]))
    for key, model in models.items():
        assert all(map(torch.equal, outputs[key], outputs["eager", key[1]])), f"{key} decodes other tokens than eager"
        # teacher-forced on the fp32 draft's own output: does the quantized draft pick the same next token?
        with torch.no_grad():
            hits = [(schemes[key[1]](t).logits[0, i.shape[1] - 1 : -1].argmax(-1) == t[0, i.shape[1]:]).float().mean().item()
                    for t, i in zip(outputs["eager", "fp32"], ids)]
        label = key[1] if key[0] == "eager" else f"{key[1]}, compiled"
        print(f"{label:<22}{statistics.median(decode[key]):>13.1f}{ratio(decode, key):>8.2f}x"
              f"{statistics.median(call[key]):>11.1f}{ratio(call, key):>8.2f}x{statistics.mean(hits):>18.3f}")
    print("goal: int4 g32 >= 2x fp32 decode tokens/s")


if __name__ == "__main__":
    main()
