import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import make_tiny_target
from lightning_spec import ExportHF
from lightning_spec.callbacks import export_hf
from lightning_spec.distill import DraftDistillationModule
from lightning_spec.models import build_draft, load_causal_lm, load_model
from lightning_spec.quant import QuantizedLinear, convert, prepare_qat, quantize_model
from lightning_spec.quant.fake import FROZEN

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea."]  # stops at EOS / runs all 24 tokens


def test_export_hf_at_fit_end(tmp_path, tiny_target, tokenizer, make_trainer, qa_datamodule):
    module = DraftDistillationModule(target=tiny_target, draft={"num_layers": 2}, tokenizer=tokenizer)
    make_trainer(callbacks=[ExportHF(str(tmp_path / "export"))]).fit(module, datamodule=qa_datamodule())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert loaded.config.num_hidden_layers == 2
    ids = torch.randint(49152, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, module.draft.eval()(ids).logits, rtol=0, atol=0)
    assert AutoTokenizer.from_pretrained(tmp_path / "export").get_vocab() == tokenizer.get_vocab()


@pytest.mark.slow
def test_exported_draft_assists_the_real_target(tmp_path, smol_dir):
    """Greedy speculative decoding with the reloaded draft reproduces the target's own greedy output."""
    target, tokenizer = load_causal_lm(smol_dir)
    export_hf(build_draft(target, num_layers=4), tokenizer, tmp_path / "draft")
    draft = AutoModelForCausalLM.from_pretrained(tmp_path / "draft")
    # an untrained draft has most candidates rejected: a long run of them only costs CPU time
    draft.generation_config.num_assistant_tokens, draft.generation_config.num_assistant_tokens_schedule = 3, "constant"
    draft_calls = []
    draft.register_forward_pre_hook(lambda *args: draft_calls.append(1))
    for prompt in PROMPTS:
        inputs = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_dict=True, return_tensors="pt"
        )
        plain = target.generate(**inputs, do_sample=False, max_new_tokens=24)
        assisted = target.generate(**inputs, assistant_model=draft, do_sample=False, max_new_tokens=24)
        assert assisted.tolist() == plain.tolist()
    assert draft_calls


def _logits(model, seed: int = 0):
    ids = torch.randint(49152, (2, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(ids).logits


@pytest.mark.parametrize("scheme", [("int4", 32, None), ("int4", 32, "int8"), ("int4_asym", 32, None), ("int8", None, None)])
def test_quantized_export_round_trips(tmp_path, scheme):
    """A QAT model (frozen, learned scales moved off the weight's) exports as a plain checkpoint transformers
    loads without missing or unexpected keys, computing the weight-only quantized numerics; load_model gives back
    QuantizedLinear layers with the exact codes and scales of convert(), so the same logits."""
    weight, group_size, activation = scheme
    model = make_tiny_target(num_layers=2)
    layers = prepare_qat(model, weight, group_size, activation, learn_scales=True, phase=FROZEN)
    with torch.no_grad():
        for layer in layers:
            layer.weight_scale.mul_(1.1)  # scales the plain min/max statistics would not give
    export_hf(model, None, tmp_path / "qat")
    converted = copy.deepcopy(model)
    convert(converted)

    plain, info = AutoModelForCausalLM.from_pretrained(tmp_path / "qat", output_loading_info=True)
    assert not any(info.values()), info
    if activation is None:
        torch.testing.assert_close(_logits(plain), _logits(model), rtol=1e-4, atol=1e-4)
    reloaded = load_model(tmp_path / "qat")
    quantized = {n: m for n, m in reloaded.named_modules() if isinstance(m, QuantizedLinear)}
    expected = {n: m for n, m in converted.named_modules() if isinstance(m, QuantizedLinear)}
    assert quantized.keys() == expected.keys() and len(quantized) == 14
    for name, layer in quantized.items():
        assert (layer.scheme, layer.activation) == (expected[name].scheme, expected[name].activation)
        for buffer in ("packed", "scales", "zeros"):
            torch.testing.assert_close(getattr(layer, buffer), getattr(expected[name], buffer), rtol=0, atol=0)
    torch.testing.assert_close(_logits(reloaded), _logits(converted), rtol=0, atol=0)


def test_export_of_quantized_and_unquantized_layers(tmp_path):
    """PTQ layers export the same way; QAT layers still off export as the float model they compute."""
    model = make_tiny_target(num_layers=2)
    quantize_model(model, "int8", include=["*.mlp.*"])
    export_hf(model, None, tmp_path / "ptq")
    torch.testing.assert_close(_logits(load_model(tmp_path / "ptq")), _logits(model), rtol=0, atol=0)

    off = make_tiny_target(num_layers=2)
    prepare_qat(off, "int4", 32)
    export_hf(off, None, tmp_path / "off")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "off")
    assert not hasattr(plain.config, "lightning_spec_quantization")
    torch.testing.assert_close(_logits(plain), _logits(off), rtol=0, atol=0)


def test_quantized_tied_head_is_refused(tmp_path):
    model = make_tiny_target(num_layers=1)
    quantize_model(model, "int8", exclude=())
    with pytest.raises(ValueError, match="'lm_head'.*tied to the input embeddings"):
        export_hf(model, None, tmp_path / "tied")
