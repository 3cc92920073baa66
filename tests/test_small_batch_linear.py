"""small_batch_linear (the compiled CPU kernel for decode and verification batches) against its float64 reference
on every CPU path, row independence, routing, bad input, and SmallBatchLinear in models and in the engine."""
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_spec import build_draft, load_causal_lm
from lightning_spec.decoding import SmallBatchLinear, speculative_generate, target_generate, use_small_batch_linear
from lightning_spec.ops import active_implementation, reference, small_batch_linear

from cpu_paths import use_cpu_path


@pytest.fixture(params=["auto", "avx2", "generic"])
def isa(request, monkeypatch):
    """Every CPU path this machine can run: the best one, AVX2, plain C++."""
    return use_cpu_path(request.param, monkeypatch)


def test_compiled_op_is_in_use():
    assert active_implementation("small_batch_linear") == "compiled"


@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 15, 16])
@pytest.mark.parametrize("N,K", [(576, 576), (37, 100), (1536, 576), (7, 1536)])
def test_matches_reference(isa, M, N, K):
    g = torch.Generator().manual_seed(M * N + K)
    w, x, bias = torch.randn(N, K, generator=g) * 0.05, torch.randn(M, K, generator=g), torch.randn(N, generator=g)
    for b in (None, bias):
        got = torch.ops.lightning_spec.small_batch_linear(x, w, b)
        torch.testing.assert_close(got.double(), reference.small_batch_linear(x, w, b).double(), rtol=2e-5, atol=2e-6 * K**0.5)


@pytest.mark.parametrize("K", [576, 100])
def test_rows_do_not_depend_on_the_others(isa, K):
    """Verifying 16 tokens at once gives each row bit for bit what it gets alone (any tile, any thread split)."""
    g = torch.Generator().manual_seed(K)
    w, x = torch.randn(1029, K, generator=g), torch.randn(16, K, generator=g)
    together = torch.ops.lightning_spec.small_batch_linear(x, w, None)
    for M in (1, 3, 5, 6, 7, 8, 9, 12, 13, 16):
        part = torch.ops.lightning_spec.small_batch_linear(x[:M], w, None)
        assert torch.equal(part, together[:M])
    assert all(torch.equal(torch.ops.lightning_spec.small_batch_linear(x[m : m + 1], w, None)[0], together[m]) for m in range(16))


def test_large_vocabulary_head_batched_and_non_contiguous():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(49152, 64, generator=g)
    x = torch.randn(64, 2, 3, generator=g).permute(1, 2, 0)  # [2, 3, 64], not contiguous
    got = small_batch_linear(x, w)
    assert got.shape == (2, 3, 49152)
    torch.testing.assert_close(got.double(), reference.small_batch_linear(x, w).double(), rtol=2e-5, atol=2e-5)


def test_other_inputs_take_f_linear():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(24, 32, generator=g), torch.randn(24, generator=g)
    for x in (torch.randn(17, 32, generator=g), torch.randn(2, 32, generator=g).bfloat16(), torch.zeros(0, 32)):
        w_, b_ = (w.bfloat16(), b.bfloat16()) if x.dtype == torch.bfloat16 else (w, b)
        assert torch.equal(small_batch_linear(x, w_, b_), F.linear(x, w_, b_))
    x = torch.randn(2, 32, generator=g, requires_grad=True)
    y = small_batch_linear(x, w, b)  # autograd: F.linear
    y.sum().backward()
    assert torch.equal(y, F.linear(x, w, b)) and torch.allclose(x.grad, w.sum(0).expand(2, 32))


@pytest.mark.parametrize(
    "args,match",
    [
        ((torch.randn(2, 32).double(), torch.randn(8, 32), None), "x must be float32"),
        ((torch.randn(2, 32), torch.randn(8, 32, 1), None), "weight must be float32 \\[N, K\\]"),
        ((torch.randn(2, 31), torch.randn(8, 32), None), "input features"),
        ((torch.randn(17, 32), torch.randn(8, 32), None), "at most 16 rows"),
        ((torch.randn(2, 32), torch.randn(8, 32), torch.randn(7)), "bias must be float32 \\[8\\]"),
    ],
)
def test_kernel_names_bad_input(args, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.lightning_spec.small_batch_linear(*args)


def tiny_llama(tied: bool):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, tie_word_embeddings=tied, eos_token_id=None)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("tied", [True, False])
def test_use_small_batch_linear_keeps_the_model(tied):
    model = tiny_llama(tied)
    keys, short, long = list(model.state_dict()), torch.randint(0, 256, (1, 9)), torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        before = model(short).logits, model(long).logits
    assert use_small_batch_linear(model) == 15  # 7 per layer and the head
    assert isinstance(model.lm_head, SmallBatchLinear) and list(model.state_dict()) == keys
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    with torch.no_grad():
        torch.testing.assert_close(model(short).logits, before[0], rtol=1e-5, atol=1e-5)  # 9 rows: the kernel
        assert torch.equal(model(long).logits, before[1])  # 20 rows: F.linear
    compiled = torch.compile(model.model.layers[0].mlp, fullgraph=True, backend="aot_eager")
    x = torch.randn(1, 3, 64)
    with torch.no_grad():
        assert torch.equal(compiled(x), model.model.layers[0].mlp(x))


def test_the_engine_on_small_batch_linear_decodes_like_its_target():
    target, draft = tiny_llama(True), tiny_llama(True)
    for layer in draft.model.layers[1:]:
        layer.mlp.down_proj.weight.data.mul_(0.5)  # a draft that differs
    use_small_batch_linear(target), use_small_batch_linear(draft)
    prompt = torch.randint(0, 256, (2, 6))
    expected = target_generate(target, prompt, 16, eos_token_id=[]).tokens
    out = speculative_generate(target, draft, prompt, 16, gamma=3, eos_token_id=[])
    assert torch.equal(out.tokens, expected) and out.stats.accepted > 0


@pytest.mark.slow
def test_smollm2_with_small_batch_linear(smol_dir):
    """The real target: greedy speculative output equals transformers' generate on the same (swapped) target."""
    target, tokenizer = load_causal_lm(smol_dir)
    draft = build_draft(target, layers=[0, 1, 2, 3])
    use_small_batch_linear(target), use_small_batch_linear(draft)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Name three rivers in Europe."}], add_generation_prompt=True, return_tensors="pt")
    ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    expected = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(speculative_generate(target, draft, ids, 24, gamma=4).tokens, expected)
