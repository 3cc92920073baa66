import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_spec import ExportHF
from lightning_spec.callbacks import export_hf
from lightning_spec.distill import DraftDistillationModule
from lightning_spec.models import build_draft, load_causal_lm

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
