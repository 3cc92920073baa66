import json

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_spec import FidelityReport
from lightning_spec.distill import DraftDistillationModule
from lightning_spec.metrics.functional import expected_accepted_length
from lightning_spec.losses import LOSSES, distill_loss, sparse_teacher_from_logits
from lightning_spec.models import next_token_logits


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_target_is_frozen_and_kept_out_of_checkpoints(make_module, make_trainer, qa_datamodule):
    module = make_module()
    assert module.state_dict() and all(k.startswith("draft.") for k in module.state_dict())
    target_before, draft_before = snapshot(module.target), snapshot(module.draft)
    make_trainer(max_steps=3).fit(module, datamodule=qa_datamodule())
    assert not module.target.training
    assert not any(p.requires_grad for p in module.target.parameters())
    torch.testing.assert_close(snapshot(module.target), target_before, rtol=0, atol=0)
    after = snapshot(module.draft)
    assert not torch.equal(after["model.layers.0.self_attn.q_proj.weight"], draft_before["model.layers.0.self_attn.q_proj.weight"])
    # the tied embeddings/head stay the target's unless train_embeddings=True
    assert torch.equal(after["model.embed_tokens.weight"], draft_before["model.embed_tokens.weight"])


def test_train_embeddings(make_module, make_trainer, qa_datamodule):
    module = make_module(train_embeddings=True)
    before = module.draft.get_input_embeddings().weight.detach().clone()
    make_trainer().fit(module, datamodule=qa_datamodule())
    assert not torch.equal(module.draft.get_input_embeddings().weight, before)


@pytest.mark.parametrize("loss", LOSSES)
def test_every_loss_trains(make_module, make_trainer, qa_datamodule, loss):
    module = make_module(loss=loss, temperature=2.0)
    trainer = make_trainer()
    trainer.fit(module, datamodule=qa_datamodule())
    assert trainer.global_step == 2
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert all(torch.isfinite(p).all() for p in module.draft.parameters())


def test_offline_teacher_never_runs_the_target(make_module, make_trainer, qa_datamodule, tiny_target, monkeypatch):
    dm = qa_datamodule(teacher_topk=4, target=tiny_target)
    dm.setup("fit")  # the teacher cache is the last use of the target

    def refuse(*args, **kwargs):
        raise AssertionError("the target ran despite the offline teacher")

    monkeypatch.setattr(tiny_target, "forward", refuse)
    monkeypatch.setattr(tiny_target, "get_decoder", refuse)
    module = make_module()
    trainer = make_trainer()
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["train/loss"])


def test_offline_teacher_loss_equals_live_topk(make_module, qa_datamodule, tiny_target):
    """The cached top-k must line up with the positions the module scores."""
    dm = qa_datamodule(teacher_topk=4, target=tiny_target)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    module = make_module(loss="rkl")
    offline = module._batch_sums(batch)[0]
    ids, attn = batch["input_ids"], batch["attention_mask"]
    select = batch["loss_mask"][:, 1:] & attn[:, 1:].bool()
    with torch.no_grad():
        live = sparse_teacher_from_logits(next_token_logits(tiny_target, ids, attn, select), 4)
    expected = distill_loss(next_token_logits(module.draft, ids, attn, select), live, "rkl", reduction="sum")
    torch.testing.assert_close(offline, expected, rtol=1e-4, atol=1e-5)


def test_on_policy_samples_from_the_draft(make_module, make_trainer, qa_datamodule, monkeypatch):
    module = make_module(on_policy_fraction=1.0, on_policy_max_new_tokens=4)
    calls = []
    generate = module.draft.generate
    monkeypatch.setattr(module.draft, "generate", lambda **kw: calls.append(kw) or generate(**kw))
    trainer = make_trainer()
    trainer.fit(module, datamodule=qa_datamodule())
    assert len(calls) == 2 and calls[0]["max_new_tokens"] == 4
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_vocab_mismatch_fails_at_construction(make_module):
    other = LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        make_module(draft=other)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(loss="kld"), "unknown loss 'kld'"),
        (dict(temperature=0.0), "temperature"),
        (dict(jsd_beta=1.0), "jsd_beta"),
        (dict(on_policy_fraction=1.5), "on_policy_fraction"),
        (dict(target_dtype="int8"), "target_dtype"),
    ],
)
def test_bad_arguments(make_module, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_module(**kwargs)


def test_bf16_teacher_fp32_draft(make_module, make_trainer, qa_datamodule):
    module = make_module(target_dtype="bfloat16")
    assert next(module.target.parameters()).dtype == torch.bfloat16
    trainer = make_trainer()
    trainer.fit(module, datamodule=qa_datamodule())
    assert all(p.dtype == torch.float32 for p in module.draft.parameters())
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_logged_metrics(make_module, make_trainer, qa_datamodule):
    # train α/agreement are computed on the steps the logger writes
    trainer = make_trainer(limit_val_batches=2, val_check_interval=2, log_every_n_steps=1)
    trainer.fit(make_module(), datamodule=qa_datamodule())
    metrics = trainer.callback_metrics
    assert {"train/loss", "train/alpha", "train/agreement", "val/loss", "val/alpha", "val/agreement"} <= set(metrics)
    for key in ("train/alpha", "val/alpha", "val/agreement"):
        assert 0.0 <= metrics[key].item() <= 1.0


@pytest.mark.parametrize("num_layers", [1, 4])
def test_measure(make_module, qa_datamodule, num_layers):
    dm = qa_datamodule()
    dm.setup("fit")
    result = make_module(draft={"num_layers": num_layers}).measure(dm.val_dataloader(), gamma=3)
    assert 0.0 <= result["alpha"] <= 1.0
    assert result["tau"] == pytest.approx(expected_accepted_length(result["alpha"], 3))
    assert result["tokens"] == sum(sum(m[1:]) for m in dm.splits["val"]["loss_mask"])
    if num_layers == 4:  # a copy of the whole target is accepted everywhere
        assert result["alpha"] == pytest.approx(1.0, abs=1e-4) and result["agreement"] == 1.0


def test_fidelity_report(tmp_path, make_module, make_trainer, qa_datamodule, capsys):
    report = FidelityReport(gamma=2, path=str(tmp_path / "fidelity.json"))
    make_trainer(callbacks=[report]).fit(make_module(), datamodule=qa_datamodule())
    written = json.loads((tmp_path / "fidelity.json").read_text())
    assert written["gamma"] == 2 and written["before"] == report.before and written["after"] == report.after
    assert 0 <= written["before"]["alpha"] <= 1 and written["after"]["tau"] == pytest.approx(
        expected_accepted_length(written["after"]["alpha"], 2)
    )
    assert "tau at gamma=2" in capsys.readouterr().out
    with pytest.raises(MisconfigurationException, match="gamma"):
        FidelityReport(gamma=0)


def test_target_and_draft_from_directories(tiny_dir, tmp_path):
    draft_dir = tmp_path / "draft"
    module = DraftDistillationModule(target=str(tiny_dir), draft={"num_layers": 1})
    module.draft.save_pretrained(draft_dir)
    reloaded = DraftDistillationModule(target=tiny_dir, draft=str(draft_dir))
    assert reloaded.tokenizer is not None and len(reloaded.tokenizer) == 49152
    torch.testing.assert_close(reloaded.draft.state_dict(), module.draft.state_dict())
