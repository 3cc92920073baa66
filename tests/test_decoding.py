"""The decoding engine: greedy output equals the target's own (tiny models and SmolLM2), sampling is lossless
(chi-square of the first three emitted tokens against the target's exact distribution), KV rollback under ragged
acceptance and compaction, stats, bad input."""
import contextlib
import copy

import pytest
import torch
from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)

from lightning_spec.decoding import chain, speculative_generate, target_generate, topk_tree, warp
from lightning_spec.decoding.engine import argmax, verify_greedy
from lightning_spec.decoding.kv import CachedLM
from lightning_spec.models import build_draft, load_causal_lm
from lightning_spec.ops import verify_tree
from lightning_spec.quant import quantize_model

from chisquare import chi_square_pvalue

TREES = {
    "chain1": dict(gamma=1),
    "chain4": dict(gamma=4),
    "topk322": dict(tree=topk_tree([3, 2, 2])),
    "sparse": dict(tree=[-1, 0, 0, 1, 1, 2, 3, 5]),
}


def peaky_llama(seed: int, vocab: int = 512, layers: int = 3, hidden: int = 32, head_scale: float = 8.0) -> LlamaForCausalLM:
    """A random Llama whose next-token distributions are far from uniform (no near-ties for greedy)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=None, eos_token_id=None,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    return model


@pytest.fixture(scope="module")
def pair():
    target = peaky_llama(0)
    return target, build_draft(target, layers=[0])


def ragged_prompts(seed: int = 1, B: int = 3, T: int = 9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 512, (B, T), generator=g)
    mask = torch.ones_like(ids)
    for b in range(B):
        mask[b, : (b * 3) % T] = 0  # left padding: rows of length 9, 6, 3
    return ids.masked_fill(mask == 0, 0), mask


# the CUDA cases run on a GPU machine (benchmarks/gpu_check.sh): the verify_tree CUDA kernel, masks and caches there
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


def hf_greedy(model, ids, mask, n, eos=None):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=eos)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", sorted(TREES))
def test_greedy_equals_the_targets_greedy(pair, shape, device):
    target, draft = (model if device == "cpu" else copy.deepcopy(model).to(device) for model in pair)
    ids, mask = (t.to(device) for t in ragged_prompts())
    expected = hf_greedy(target, ids, mask, 40)
    out = speculative_generate(target, draft, ids, 40, attention_mask=mask, eos_token_id=[], **TREES[shape])
    assert torch.equal(out.tokens, expected)
    assert torch.equal(target_generate(target, ids, 40, attention_mask=mask, eos_token_id=[]).tokens, expected)
    s = out.stats
    assert s.new_tokens == 3 * 40 and s.row_rounds >= s.target_calls and s.accepted <= s.drafted
    assert s.position_attempts[0] == s.row_rounds  # position 1 is verified every round


def test_argmax_is_tensor_argmax():
    """The engine's argmax (through ``max``): Tensor.argmax's index on ties (the first) and with NaN, at vocabulary sizes."""
    g = torch.Generator().manual_seed(0)
    for V in (1, 7, 49152, 50001):
        logits = torch.randint(-3, 3, (4, 3, V), generator=g).float()  # ties at the maximum
        logits[1, :, V // 2] = float("nan")
        assert torch.equal(argmax(logits), logits.argmax(-1))


def test_greedy_verification_reads_the_logits_argmax():
    # logits 1e-8 apart have equal softmax probabilities in float32: the probabilities' argmax would be token 0,
    # target_generate takes token 1
    logits = torch.tensor([[[0.0, 1e-8, -1.0], [2.0, 2.0, 0.0]]])
    assert torch.equal(warp(logits, 0.0, 1.0)[0, 0, 0], warp(logits, 0.0, 1.0)[0, 0, 1])
    parents = torch.tensor([[-1, 0]])
    accepted, num_accepted, next_token = verify_greedy(torch.tensor([[2, 1]]), parents, logits)
    assert accepted.tolist() == [[0, 1]] and num_accepted.tolist() == [1] and next_token.tolist() == [0]  # ties: the first
    accepted, num_accepted, next_token = verify_greedy(torch.tensor([[2, 0]]), parents, logits)
    assert accepted.tolist() == [[0, -1]] and num_accepted.tolist() == [0] and next_token.tolist() == [1]


def test_greedy_verification_on_few_tokens_is_verify_tree_on_the_vocabulary():
    """verify_greedy renumbers the tokens that occur: the same paths and tokens as verify_tree on full one-hot rows,
    over random trees, ragged batches and tokens anywhere in a large vocabulary."""
    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        B, V = 3, 50000
        parents = torch.tensor(topk_tree([2, 2]) if trial % 2 else chain(4))
        N = parents.numel()
        logits = torch.randn(B, N, V, generator=g)
        candidates = torch.randint(0, V, (B, N), generator=g)
        hits = torch.rand(B, N, generator=g) < 0.6  # make most candidates the argmax at their parent
        best = logits.argmax(-1)
        candidates[:, 1:] = torch.where(hits[:, 1:], best.gather(1, parents[1:].expand(B, -1)), candidates[:, 1:])
        one_hot = torch.zeros(B, N, V).scatter_(-1, best[..., None], 1.0)
        expected = verify_tree(candidates, parents.expand(B, N), one_hot, greedy=True)
        got = verify_greedy(candidates, parents.expand(B, N), logits)
        assert all(torch.equal(a, b) for a, b in zip(got, expected))


@pytest.mark.parametrize("shape", sorted(TREES))
def test_the_target_as_its_own_draft_accepts_everything(pair, shape):
    target, _ = pair
    ids, mask = ragged_prompts()
    out = speculative_generate(target, target, ids, 30, attention_mask=mask, eos_token_id=[], **TREES[shape])
    depth = out.stats.max_depth
    assert torch.equal(out.tokens, hf_greedy(target, ids, mask, 30))
    assert out.stats.acceptance_per_position == [1.0] * depth
    assert out.stats.target_calls == -(-30 // (depth + 1))  # ceil: depth + 1 tokens per call
    # the last round's draft tokens past max_new_tokens were accepted but not emitted: they do not count
    assert out.stats.accepted == 3 * (30 // (depth + 1) * depth + 30 % (depth + 1)) <= out.stats.new_tokens


def test_a_path_ending_at_a_leaf_verifies_no_deeper(pair, monkeypatch):
    """In an uneven tree a round whose accepted path ends at a leaf above the tree's depth verified nothing deeper."""
    from lightning_spec.decoding import engine

    def to_the_leaf(candidates, parents, target_probs, draft_probs=None, **kwargs):  # node 2: a leaf at depth 1
        B, N = candidates.shape
        accepted = torch.full((B, N), -1, dtype=torch.long)
        accepted[:, 0], accepted[:, 1] = 0, 2
        return accepted, torch.ones(B, dtype=torch.long), target_probs[:, 2].argmax(-1)

    monkeypatch.setattr(engine, "verify_tree", to_the_leaf)
    target, draft = pair
    ids, mask = ragged_prompts()
    s = speculative_generate(target, draft, ids, 10, attention_mask=mask, eos_token_id=[], tree=[-1, 0, 0, 1]).stats
    assert s.position_attempts == [s.row_rounds, 0] and s.position_accepts == [s.row_rounds, 0]


def test_rows_stop_at_eos_and_are_padded(pair):
    target, draft = pair
    ids, mask = ragged_prompts()
    free = hf_greedy(target, ids, mask, 12)
    eos = int(free[0, ids.shape[1] + 4])  # row 0 emits it as its 5th token
    expected = hf_greedy(target, ids, mask, 12, eos=eos)
    out = speculative_generate(target, draft, ids, 12, attention_mask=mask, eos_token_id=eos, gamma=3)
    assert torch.equal(out.tokens, expected)
    assert out.tokens[0, ids.shape[1] + 5 :].eq(0).all()
    for given in (torch.tensor([eos]), torch.tensor(eos), [torch.tensor(eos)]):  # as generate() takes them
        assert torch.equal(speculative_generate(target, draft, ids, 12, attention_mask=mask, eos_token_id=given, gamma=3).tokens, expected)


def test_tau_counts_what_a_cut_round_emitted(pair):
    target, _ = pair
    ids = torch.tensor([[5, 6, 7, 8]])
    for n, tau in ((1, 1.0), (2, 2.0), (6, 3.0)):  # gamma 4, all accepted: rounds of 5 tokens, the last one cut
        stats = speculative_generate(target, target, ids, n, gamma=4, eos_token_id=[]).stats
        assert stats.tau == tau and stats.new_tokens == n


def test_settings_the_engine_does_not_apply_are_warned_about(pair):
    target, draft = pair
    target = copy.deepcopy(target)
    target.generation_config.repetition_penalty = 1.3
    with pytest.warns(UserWarning, match="repetition_penalty=1.3"):
        speculative_generate(target, draft, torch.tensor([[5, 6, 7, 8]]), 4)


def test_rollback_survives_compaction(pair, monkeypatch):
    target, draft = pair
    compactions = []
    original = CachedLM.compact

    def spy(self):
        before = self.slots
        original(self)
        compactions.append(before > self.slots)

    monkeypatch.setattr(CachedLM, "compact", spy)
    ids, mask = ragged_prompts()
    out = speculative_generate(target, draft, ids, 120, attention_mask=mask, eos_token_id=[], gamma=7)
    assert any(compactions)
    assert torch.equal(out.tokens, hf_greedy(target, ids, mask, 120))


def test_grouped_query_attention_needs_no_repeated_cache(pair, monkeypatch):
    """The engine's multi-token forwards stack the query heads that share a key/value head along the query axis
    (grouped_sdpa_attention) instead of repeating the cache per head: the same logits, on a tree mask over a ragged
    batch, as transformers' SDPA; the model's own setting is back afterwards, and an "eager" model is left alone."""
    import lightning_spec.decoding.attention as attention
    import lightning_spec.decoding.kv as kv

    target = pair[0]
    ids, mask = ragged_prompts()
    q = ids.shape[1]
    see = torch.ones(q, q, dtype=torch.bool).tril() & mask.bool()[:, None, :] | torch.eye(q, dtype=torch.bool)
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    tree = torch.tensor([-1, 0, 0, 1, 1, 2])  # a second forward: six tree nodes over the committed prompts
    nodes = torch.randint(1, 512, (ids.shape[0], 6), generator=torch.Generator().manual_seed(0))
    node_see = torch.eye(6, dtype=torch.bool)
    for i in range(1, 6):
        node_see[i] |= node_see[int(tree[i])]

    def logits():
        lm = CachedLM(target, ids.shape[0], ids.device)
        lm.forward(ids, positions, see)
        lm.commit(mask.bool())
        return lm.forward(nodes, lm.length[:, None] + torch.tensor([0, 1, 1, 2, 2, 2]), node_see[None])

    calls, sdpa = [], torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: calls.append(a[0].shape) or sdpa(*a, **k))
    grouped = logits()
    assert calls[-3:] == [(3, 2, 2 * 6, 8)] * 3  # per layer: 2 kv heads, each with its 2 query heads' 6 nodes
    long = torch.randint(1, 512, (1, 16))  # 2 groups x 16 queries >= 4 heads x 8 dims: the mask would outgrow the cache
    CachedLM(target, 1, ids.device).forward(long, torch.arange(16)[None], torch.ones(16, 16, dtype=torch.bool).tril()[None])
    assert calls[-1] == (1, 4, 16, 8)  # transformers' path, the cache repeated per head
    monkeypatch.setattr(kv, "grouped_attention", lambda model: contextlib.nullcontext())
    torch.testing.assert_close(grouped, logits(), rtol=1e-5, atol=1e-5)
    assert target.config._attn_implementation == "sdpa"
    eager = copy.deepcopy(target)
    eager.set_attn_implementation("eager")
    with attention.grouped_attention(eager):
        assert eager.config._attn_implementation == "eager"


def test_kept_logits_read_contiguous_hidden_states(pair):
    """A prefill's last-position logits come from a contiguous copy of the hidden states: a strided slice sends
    CPU bf16 matmul down a path that broadcasts the head per row (8 GB at batch 160 on SmolLM2)."""
    target = copy.deepcopy(pair[0]).to(torch.bfloat16)
    seen = []
    target.get_output_embeddings().register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
    ids, mask = ragged_prompts()
    q = ids.shape[1]
    see = torch.ones(q, q, dtype=torch.bool).tril()
    positions = torch.arange(q).expand_as(ids)
    last = CachedLM(target, ids.shape[0], ids.device).forward(ids, positions, see, logits_to_keep=1)
    every = CachedLM(target, ids.shape[0], ids.device).forward(ids, positions, see)
    assert seen == [True, True] and last.shape == (ids.shape[0], 1, every.shape[-1])
    torch.testing.assert_close(last[:, 0], every[:, -1])


def test_a_compiled_draft_compiles_once(pair):
    """torch.compile over a model in the engine: once a call has compiled its shapes (the prompt, the first step, one
    or two new tokens), the next one compiles nothing, rather than once per forward on a guard on that forward's mask."""
    from torch._dynamo.utils import counters

    target, _ = pair
    draft = build_draft(target, layers=[0])
    ids = torch.randint(1, 512, (1, 9), generator=torch.Generator().manual_seed(0))
    expected = target_generate(target, ids, 24, eos_token_id=[]).tokens
    torch._dynamo.reset()
    counters.clear()
    draft.forward = torch.compile(draft.forward, dynamic=True)
    with torch._dynamo.config.patch(recompile_limit=64):
        assert torch.equal(speculative_generate(target, draft, ids, 24, eos_token_id=[], gamma=2).tokens, expected)
        compiled = counters["stats"]["unique_graphs"]
        assert torch.equal(speculative_generate(target, draft, ids, 24, eos_token_id=[], gamma=2).tokens, expected)
    assert counters["stats"]["unique_graphs"] == compiled <= 6
    torch._dynamo.reset()


# ---------------------------------------------------------------- lossless sampling

def exact_first_three(target, prompt, V, temperature, top_p):
    """P(t1, t2, t3) of the target's own sampling, [V, V, V], by enumerating every two-token continuation."""
    pairs = torch.cartesian_prod(torch.arange(V), torch.arange(V))
    seqs = torch.cat([prompt.expand(V * V, -1), pairs], 1)
    with torch.no_grad():
        probs = warp(target(seqs).logits[:, -3:].double(), temperature, top_p).double()
    p1 = probs[0, 0]
    p2 = probs[:, 1].view(V, V, V)[:, 0]  # [t1, t2]: the same for every t2 of the pair
    p3 = probs[:, 2].view(V, V, V)  # [t1, t2, t3]
    return p1[:, None, None] * p2[:, :, None] * p3


SAMPLING_CASES = [  # name, tree or chain, temperature, top_p, the draft's vocabulary against the target's 8
    ("target_only", {}, 1.0, 1.0, 8),
    ("chain1", dict(gamma=1), 1.0, 1.0, 8),
    ("chain2", dict(gamma=2), 0.9, 0.9, 8),
    ("topk22", dict(tree=topk_tree([2, 2])), 1.0, 1.0, 8),
    ("sparse", dict(tree=[-1, 0, 0, 1]), 0.9, 0.9, 8),
    ("chain2 draft of 6 ids", dict(gamma=2), 1.0, 1.0, 6),  # padded embeddings: 6 shared ids, q = 0 past them
    ("chain2 draft of 10 ids", dict(gamma=2), 1.0, 1.0, 10),  # the draft's q renormalized over the 8 shared ids
    ("topk22 draft of 10 ids", dict(tree=topk_tree([2, 2])), 1.0, 1.0, 10),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,shape,temperature,top_p,draft_vocab", SAMPLING_CASES)
def test_sampling_follows_the_target(name, shape, temperature, top_p, draft_vocab, device):
    V, trials = 8, 20_000
    target = peaky_llama(3, vocab=V, head_scale=4.0)
    draft = peaky_llama(4, vocab=draft_vocab, head_scale=4.0, layers=1)
    prompt = torch.tensor([[1, 5, 2, 7]])
    exact = exact_first_three(target, prompt, V, temperature, top_p)  # on the CPU
    target, draft = target.to(device), draft.to(device)
    g = torch.Generator(device=device).manual_seed(7)
    common = dict(temperature=temperature, top_p=top_p, generator=g, eos_token_id=[])
    batch = prompt.expand(trials, -1).contiguous().to(device)
    if name == "target_only":
        out = target_generate(target, batch, 3, **common)
    else:
        out = speculative_generate(target, draft, batch, 3, **shape, **common)
        assert 0 < out.stats.accepted < out.stats.drafted
    t = out.tokens[:, -3:].cpu()
    counts = torch.bincount(t[:, 0] * V * V + t[:, 1] * V + t[:, 2], minlength=V**3).double()
    assert chi_square_pvalue(counts, exact.flatten()) > 1e-3


# ---------------------------------------------------------------- the real target

@pytest.mark.slow
def test_greedy_on_smollm2_equals_generate(smol_dir):
    target, tokenizer = load_causal_lm(smol_dir)
    draft = build_draft(target, layers=[0, 1, 2, 3])
    prompts = ["What is the capital of France?", "Write a haiku about autumn leaves.", "List three uses of copper and explain each one briefly."]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) for p in prompts]
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    expected = target.generate(**batch, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    for shape in (dict(gamma=4), dict(tree=topk_tree([2, 2, 1]))):
        out = speculative_generate(target, draft, batch["input_ids"], 24, attention_mask=batch["attention_mask"], **shape)
        assert torch.equal(out.tokens, expected), shape


def test_a_tiny_temperature_samples_the_argmax(pair):
    """T = 1e-45 divides logits into overflow unless they are shifted first: it is greedy decoding, sampled."""
    target, draft = pair
    ids, mask = ragged_prompts()
    out = speculative_generate(target, draft, ids, 12, attention_mask=mask, eos_token_id=[], gamma=3, temperature=1e-45)
    assert torch.equal(out.tokens, hf_greedy(target, ids, mask, 12))


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(gamma=0), "gamma"),
        (dict(tree=[0, 0]), "tree"),
        (dict(tree=[-1, 2, 0]), "node 1 has parent 2"),
        (dict(tree=[-1] + [0] * 513), "vocabulary has only 512"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(input_ids=torch.ones(4)), "input_ids"),
        (dict(input_ids=torch.ones(1, 4)), "input_ids"),
        (dict(attention_mask=torch.tensor([[1, 1, 1, 0]])), "left-padded"),
        (dict(attention_mask=torch.ones(1, 3)), "attention_mask"),
    ],
)
def test_bad_input_is_named(pair, kwargs, match):
    target, draft = pair
    args = dict(input_ids=torch.tensor([[5, 6, 7, 8]]), max_new_tokens=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        speculative_generate(target, draft, **args)


def test_a_quantized_draft_head_included_decodes_like_the_target(pair):
    target, draft = pair
    draft = copy.deepcopy(draft)
    quantize_model(draft, "int8", None, exclude=())  # the head too: a QuantizedLinear has no .weight
    ids, mask = ragged_prompts()
    out = speculative_generate(target, draft, ids, 24, attention_mask=mask, gamma=3, eos_token_id=[])
    assert torch.equal(out.tokens, hf_greedy(target, ids, mask, 24)) and out.stats.accepted > 0


SLIDING = {  # a window of 5 positions, far shorter than 9 prompt + 30 new tokens
    "mistral": lambda **kw: MistralForCausalLM(MistralConfig(sliding_window=5, **kw)),  # every layer slides
    "qwen2": lambda **kw: Qwen2ForCausalLM(Qwen2Config(use_sliding_window=True, sliding_window=5, max_window_layers=1, **kw)),
    "gemma2": lambda **kw: Gemma2ForCausalLM(Gemma2Config(  # eager attention with soft-capped scores
        sliding_window=5, head_dim=8, layer_types=["sliding_attention", "full_attention", "sliding_attention"], **kw)),
    "gemma3": lambda **kw: Gemma3ForCausalLM(Gemma3TextConfig(
        sliding_window=5, head_dim=8, layer_types=["sliding_attention", "full_attention", "sliding_attention"], **kw)),
}


@pytest.mark.parametrize("arch", sorted(SLIDING))
def test_sliding_window_layers_decode_like_generate(arch, monkeypatch):
    """Sliding-window layers (all of them, or mixed with full attention) keep every slot in the engine's cache and
    hide what lies 5 or more positions back, as transformers does: greedy output equals generate's for chains
    and trees. Without the window (every layer read as full attention) the output differs."""
    import lightning_spec.decoding.kv as kv

    torch.manual_seed(0)
    target = SLIDING[arch](vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=0, bos_token_id=None,
                           eos_token_id=None, tie_word_embeddings=False).eval()
    with torch.no_grad():
        target.lm_head.weight.mul_(8.0)
    draft = build_draft(target, layers=[0])
    ids = torch.randint(1, 512, (2, 9), generator=torch.Generator().manual_seed(1))
    expected = target.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, do_sample=False,
                               pad_token_id=0, eos_token_id=None)
    for shape in (dict(gamma=3), dict(tree=topk_tree([2, 2]))):
        assert torch.equal(speculative_generate(target, draft, ids, 30, eos_token_id=[], **shape).tokens, expected), shape
    assert torch.equal(target_generate(target, ids, 30, eos_token_id=[]).tokens, expected)
    monkeypatch.setattr(kv, "attention_windows", lambda config: {"full_attention": None})
    assert not torch.equal(target_generate(target, ids, 30, eos_token_id=[]).tokens, expected)


def test_other_attention_kinds_are_refused(pair):
    target = copy.deepcopy(pair[0])
    target.config.attention_chunk_size = 4  # chunked attention (Llama 4): not a window the engine can mask
    with pytest.raises(ValueError, match="chunked_attention"):
        target_generate(target, torch.tensor([[5, 6, 7]]), 4)


def test_vocabulary_mismatch_is_refused(pair):
    target, _ = pair
    with pytest.raises(ValueError, match="vocabulary mismatch: draft has 2048 output tokens, target has 512"):
        speculative_generate(target, peaky_llama(1, vocab=2048), torch.tensor([[5, 6]]), 4)


@pytest.mark.parametrize("draft_vocab", [500, 520])
def test_padded_vocabularies_decode_like_the_target(pair, draft_vocab):
    """A draft scoring fewer or more ids than the target (embedding padding, as Qwen2.5's sizes differ) proposes the
    ids both have: greedy output is generate's, for chains and trees."""
    target, draft = pair
    draft = copy.deepcopy(draft)
    draft.resize_token_embeddings(draft_vocab)
    ids, mask = ragged_prompts()
    expected = hf_greedy(target, ids, mask, 30)
    for shape in (dict(gamma=3), dict(tree=topk_tree([3, 2]))):
        out = speculative_generate(target, draft, ids, 30, attention_mask=mask, eos_token_id=[], **shape)
        assert torch.equal(out.tokens, expected) and out.stats.accepted > 0, shape


def test_chain_is_the_parents_of_a_path():
    assert chain(3) == [-1, 0, 1, 2]
    assert topk_tree([2, 1]) == [-1, 0, 0, 1, 2]


def test_sample_follows_each_rows_distribution(monkeypatch):
    """The inverse-CDF sampler: each row's draws fit its distribution; zero-probability tokens (top-p cuts, a row's
    tail after its last positive token) never come out; a seeded generator replays."""
    from lightning_spec.decoding.engine import sample

    probs = torch.tensor([
        [0.5, 0.0, 0.25, 0.125, 0.125, 0.0],
        [0.0, 0.0, 0.0, 0.0, 0.0, 1.0],
        [1e-3, 0.0, 0.0, 0.999, 0.0, 0.0],
        [0.2, 0.2, 0.2, 0.2, 0.2, 0.0],
    ])
    draws = torch.stack([sample(probs, torch.Generator().manual_seed(i)) for i in range(4000)])
    assert (draws[:, 1] == 5).all()
    for row in (0, 2, 3):
        counts = torch.bincount(draws[:, row], minlength=probs.shape[1]).double()
        assert chi_square_pvalue(counts, probs[row].double()) > 1e-3
    replay = torch.stack([sample(probs, torch.Generator().manual_seed(i)) for i in range(4000)])
    assert torch.equal(draws, replay)
    # torch.rand's largest float64 draw, 1 - 2**-53, must still land on a token that has mass
    monkeypatch.setattr(torch, "rand", lambda shape, **kwargs: torch.full(shape, 1 - 2.0**-53, dtype=torch.float64))
    assert sample(torch.tensor([[0.3, 0.7, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4]])).tolist() == [1, 3]

