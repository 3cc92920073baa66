import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from transformers import AutoModelForCausalLM

from conftest import make_tiny_target
from lightning_spec.data import collate_tokens
from lightning_spec.lens import fit_head, untie_head
from lightning_spec.losses import acceptance
from lightning_spec.models import build_draft, next_token_logits


def batches(tokenizer, n: int = 6, seed: int = 0):
    """Random right-padded batches with 154 loss positions (more than the tiny models' 64 hidden dimensions)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = 25 + 3 * i
        ids = torch.randint(3, 1000, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "loss_mask": [0] * 4 + [1] * (length - 4)})
    return [collate_tokens(rows[i : i + 3], tokenizer.pad_token_id) for i in range(0, n, 3)]


def hidden_at_loss_positions(model, batch):
    select = batch["loss_mask"][:, 1:] & batch["attention_mask"][:, 1:].bool()
    out = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return out[:, :-1][select].double()


def test_fit_equals_least_squares(tokenizer):
    target = make_tiny_target()
    draft = build_draft(target, num_layers=2)
    untie_head(draft)
    data = batches(tokenizer)
    lens = fit_head(draft, target, data, ridge=0.0)
    with torch.no_grad():
        x = torch.cat([hidden_at_loss_positions(draft, b) for b in data])
        y = torch.cat([hidden_at_loss_positions(target, b) for b in data])
    expected = torch.linalg.lstsq(x, y).solution
    torch.testing.assert_close(lens, expected, rtol=1e-6, atol=1e-8)
    head = target.get_output_embeddings().weight.double() @ expected.T
    torch.testing.assert_close(draft.get_output_embeddings().weight, head.float())
    assert ((x @ lens - y).norm() < (x - y).norm())  # the lens translates better than the identity


def test_the_whole_target_fits_itself(tokenizer):
    target = make_tiny_target()
    draft = build_draft(target, num_layers=4)
    untie_head(draft)
    lens = fit_head(draft, target, batches(tokenizer), ridge=0.0)
    torch.testing.assert_close(lens, torch.eye(64, dtype=torch.float64), rtol=0, atol=1e-8)


def test_fit_raises_acceptance_on_smollm2(smol_dir, tokenizer):
    """The 4-layer cut of SmolLM2: its untrained α is about 0.08, the fitted head's several times that."""
    from lightning_spec.models import load_model

    target = load_model(smol_dir).eval()
    draft = build_draft(target, num_layers=4).eval()
    text = [
        "The quick brown fox jumps over the lazy dog because it wanted to reach the river before the sun set.",
        "To bake bread, mix flour, water, salt and yeast, knead the dough, let it rise, then bake it until golden.",
        "Photosynthesis lets plants turn sunlight, water and carbon dioxide into sugar and oxygen.",
        "A prime number has exactly two divisors: one and itself. The first few are 2, 3, 5, 7 and 11.",
    ]
    rows = [{"input_ids": ids, "loss_mask": [1] * len(ids)} for ids in tokenizer(text)["input_ids"]]
    data = [collate_tokens(rows, tokenizer.pad_token_id)]

    def alpha():
        batch = data[0]
        select = batch["loss_mask"][:, 1:] & batch["attention_mask"][:, 1:].bool()
        with torch.no_grad():
            q = next_token_logits(draft, batch["input_ids"], batch["attention_mask"], select).log_softmax(-1)
            p = next_token_logits(target, batch["input_ids"], batch["attention_mask"], select).log_softmax(-1)
        return acceptance(q, p).mean().item()

    before = alpha()
    untie_head(draft)
    assert alpha() == before  # an untied copy changes nothing
    fit_head(draft, target, data)
    assert before < 0.15 and alpha() > 2 * before


def test_untied_head_is_saved_and_loaded(tmp_path, tokenizer):
    draft = build_draft(make_tiny_target(), num_layers=2)
    untie_head(draft)
    assert draft.get_output_embeddings().weight is not draft.get_input_embeddings().weight
    with torch.no_grad():
        draft.get_output_embeddings().weight.mul_(2.0)
    draft.save_pretrained(tmp_path / "draft")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "draft")
    assert not loaded.config.tie_word_embeddings
    torch.testing.assert_close(loaded.get_output_embeddings().weight, draft.get_output_embeddings().weight, rtol=0, atol=0)
    torch.testing.assert_close(loaded.get_input_embeddings().weight, draft.get_input_embeddings().weight, rtol=0, atol=0)


def test_bad_input(tokenizer):
    target = make_tiny_target()
    draft = build_draft(target, num_layers=2)
    with pytest.raises(ValueError, match="untied"):
        fit_head(draft, target, batches(tokenizer))
    untie_head(draft)
    with pytest.raises(ValueError, match="ridge"):
        fit_head(draft, target, batches(tokenizer), ridge=-1.0)
    empty = batches(tokenizer)[0]
    empty["loss_mask"][:] = False
    with pytest.raises(ValueError, match="no loss positions"):
        fit_head(draft, target, [empty])


def test_module_fits_the_head_once_before_training(make_module, make_trainer, qa_datamodule, monkeypatch, tmp_path):
    module = make_module(fit_head_samples=6)
    draft = module.draft
    assert draft.get_output_embeddings().weight is not draft.get_input_embeddings().weight
    calls = []
    import lightning_spec.distill as distill

    real = distill.fit_head

    def spy(draft, target, samples):
        samples = list(samples)
        calls.append(sum(len(b["input_ids"]) for b in samples))
        real(draft, target, samples)
        first_step = draft.get_output_embeddings().weight.detach().clone()
        calls.append(first_step)

    monkeypatch.setattr(distill, "fit_head", spy)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    make_trainer(max_steps=2, callbacks=[checkpoint], enable_checkpointing=True).fit(module, datamodule=qa_datamodule())
    assert calls[0] == 6
    # fitted before the first step (frozen head: training leaves it as fitted)
    torch.testing.assert_close(draft.get_output_embeddings().weight, calls[1], rtol=0, atol=0)
    assert not torch.equal(draft.get_output_embeddings().weight, draft.get_input_embeddings().weight)

    # a second fit, and a resumed run, keep the fitted (and trained) head
    make_trainer(max_steps=1).fit(module, datamodule=qa_datamodule())
    resumed = make_module(fit_head_samples=6)
    make_trainer(max_steps=3).fit(resumed, datamodule=qa_datamodule(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert len(calls) == 2
    torch.testing.assert_close(resumed.draft.get_output_embeddings().weight, calls[1], rtol=0, atol=0)


@pytest.mark.parametrize("option", ["fit_head_samples", "calibrate_head_samples"])
def test_module_rejects_negative_samples(make_module, option):
    with pytest.raises(ValueError, match=option):
        make_module(**{option: -1})


def test_calibration_undoes_a_flattened_head(make_module, make_trainer, qa_datamodule, tiny_target):
    # the target as its own draft, its head scaled by 0.8: alpha is 1 only at the grid's 1.25, which calibration
    # must pick after training (lr 0: the draft is still that) and before on_fit_end
    draft = make_tiny_target().requires_grad_(True)
    draft.load_state_dict(tiny_target.state_dict())
    untie_head(draft)
    draft.get_output_embeddings().weight.data.mul_(0.8)
    seen = []

    class AtFitEnd(Callback):
        def on_fit_end(self, trainer, pl_module):
            seen.append(pl_module.draft.get_output_embeddings().weight.detach().clone())

    module = make_module(draft=draft, calibrate_head_samples=6, optimizer=lambda params: torch.optim.SGD(params, lr=0.0))
    make_trainer(max_steps=1, callbacks=[AtFitEnd()]).fit(module, datamodule=qa_datamodule())
    torch.testing.assert_close(seen[0], tiny_target.get_output_embeddings().weight)
