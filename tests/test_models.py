import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import make_tiny_target
from lightning_spec.models import build_draft, check_vocab_compatible, load_causal_lm, next_token_logits


def layer_params(model, i):
    return dict(model.model.layers[i].named_parameters())


def test_load_embedded_smollm2(smol_dir):
    model, tokenizer = load_causal_lm("smollm2-135m-instruct")
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.num_hidden_layers == 30
    assert model.get_output_embeddings().weight.shape[0] == 49152
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == 2
    assert tokenizer.chat_template


def test_unknown_name_lists_embedded_models():
    with pytest.raises(FileNotFoundError, match="smollm2-135m-instruct"):
        load_causal_lm("no-such-model")


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither"):
        load_causal_lm(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_causal_lm(tmp_path)  # a directory without config.json


def test_load_hf_directory(tiny_dir, tiny_target):
    model, tokenizer = load_causal_lm(tiny_dir)
    torch.testing.assert_close(model.state_dict(), tiny_target.state_dict())
    assert len(tokenizer) == 49152


@pytest.mark.parametrize("layers", [[0, 1, 2, 3], [0, 2], [3, 0], [0, 5]])
def test_build_draft_copies_the_chosen_layers(layers):
    target = make_tiny_target(num_layers=6)
    draft = build_draft(target, layers=layers)
    assert draft.config.num_hidden_layers == len(layers)
    for j, i in enumerate(layers):
        expected = layer_params(target, i)
        for name, value in layer_params(draft, j).items():
            torch.testing.assert_close(value, expected[name], rtol=0, atol=0)
    torch.testing.assert_close(draft.model.norm.weight, target.model.norm.weight)
    torch.testing.assert_close(draft.get_input_embeddings().weight, target.get_input_embeddings().weight)
    torch.testing.assert_close(draft.get_output_embeddings().weight, target.get_output_embeddings().weight)
    assert draft.get_input_embeddings().weight.data_ptr() != target.get_input_embeddings().weight.data_ptr()


def test_build_draft_num_layers_keeps_the_first_k(tiny_target):
    draft = build_draft(tiny_target, num_layers=2)
    assert draft.config.num_hidden_layers == 2
    for name, value in layer_params(draft, 1).items():
        torch.testing.assert_close(value, layer_params(tiny_target, 1)[name])


def test_build_draft_with_all_layers_reproduces_the_target(tiny_target):
    ids = torch.randint(49152, (2, 7), generator=torch.Generator().manual_seed(0))
    draft = build_draft(tiny_target, num_layers=4)
    torch.testing.assert_close(draft(ids).logits, tiny_target(ids).logits)


@pytest.mark.parametrize("family,fields", [
    ("gpt2", dict(n_embd=32, n_layer=3, n_head=4)),  # transformer.h.<i>
    ("opt", dict(hidden_size=32, ffn_dim=64, num_hidden_layers=3, num_attention_heads=4, word_embed_proj_dim=32)),  # model.decoder.layers.<i>
    ("qwen2", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)),
])
def test_build_draft_finds_the_decoder_layers_of_other_families(family, fields):
    """A draft of layers [0, 2] of a 3-layer target computes what the target computes with layer 1 skipped."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    target = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, vocab_size=96, **fields)).eval()
    draft = build_draft(target, layers=[0, 2]).eval()
    layers = next(m for m in target.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == 3)
    ids = torch.randint(96, (1, 6))
    with torch.no_grad():
        got = draft(ids).logits
        del layers[1]  # the kept layers keep their layer_idx, so run the cut target without a KV cache
        torch.testing.assert_close(got, target(ids, use_cache=False).logits)


def test_build_draft_keeps_the_attention_kind_of_each_kept_layer():
    """layer_types (sliding / full attention per layer) follow the kept layers; a new depth derives its own."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("qwen2", vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                                  sliding_window=4, max_window_layers=1)
    target = AutoModelForCausalLM.from_config(config)
    assert build_draft(target, layers=[0, 2]).config.layer_types == ["full_attention", "sliding_attention"]
    assert build_draft(target, layers=[2, 0]).config.layer_types == ["sliding_attention", "full_attention"]
    deeper = build_draft(target, config={"num_hidden_layers": 5}, init="random")
    assert deeper.config.layer_types == ["full_attention"] + ["sliding_attention"] * 4


def test_build_draft_random_init_differs(tiny_target):
    draft = build_draft(tiny_target, num_layers=2, init="random")
    assert not torch.equal(layer_params(draft, 0)["self_attn.q_proj.weight"], layer_params(tiny_target, 0)["self_attn.q_proj.weight"])
    assert not torch.equal(draft.get_input_embeddings().weight, tiny_target.get_input_embeddings().weight)


def test_build_draft_from_config(tiny_target):
    draft = build_draft(tiny_target, config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}, init="random")
    assert draft.config.hidden_size == 32
    assert draft.get_output_embeddings().weight.shape == (49152, 32)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(layers=[0], num_layers=1), "exactly one"),
        (dict(), "exactly one"),
        (dict(layers=[0, 4]), "0..3"),
        (dict(layers=[-1]), "0..3"),
        (dict(layers=[]), "non-empty"),
        (dict(num_layers=0), "1..4"),
        (dict(num_layers=5), "1..4"),
        (dict(num_layers=2, init="zeros"), "init"),
        (dict(config={"hidden_size": 32}), "init='copy' needs layers"),
        (dict(config={"vocab_size": 1000}, init="random"), "vocabulary mismatch"),
    ],
)
def test_build_draft_bad_arguments(tiny_target, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_draft(tiny_target, **kwargs)


def test_check_vocab_compatible(tiny_target, tokenizer):
    other = LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        check_vocab_compatible(other, tiny_target)
    check_vocab_compatible(build_draft(tiny_target, num_layers=1), tiny_target, tokenizer, tokenizer)


def test_next_token_logits_ignores_padding_and_selects_positions(tiny_target):
    ids = torch.randint(3, 49152, (1, 6), generator=torch.Generator().manual_seed(1))
    padded = torch.cat([torch.full((1, 3), 2), ids], 1)  # left padding
    attn = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], 1)
    select = attn[:, 1:].bool()
    select[0, 2] = False  # the pad position predicting the first real token is not wanted
    got = next_token_logits(tiny_target, padded, attn, select)
    expected = tiny_target(ids).logits[0, :-1]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
