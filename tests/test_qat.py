"""QAT: fake quantization's numerics and gradients, QATScheduler's phases, learned scales, resume in every phase,
convert, fit twice / validate / test(ckpt_path), YAML, bad input. DDP is in test_ddp.py."""
import copy

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from conftest import make_tiny_target
from lightning_spec.callbacks import QATScheduler
from lightning_spec.distill import DraftDistillationModule
from lightning_spec.models import build_draft
from lightning_spec.quant import FakeQuantLinear, QuantizedLinear, convert, dequantize_weight, prepare_qat, quantize_weight
from lightning_spec.quant.fake import FROZEN, OBSERVE, OFF
from lightning_spec.ops.fake_quant import fake_quantize_activation, fake_quantize_weight
from lightning_spec.quant.numerics import quantize_activation, qrange, weight_qparams

# (weight, group_size, activation)
CONFIGS = [("int4", 32, None), ("int4", 64, None), ("int4_asym", 32, None), ("int8", None, None), ("int8", None, "int8"),
           ("int4", 32, "int8")]


def linear(seed=0, n=48, k=128):
    torch.manual_seed(seed)
    layer = nn.Linear(k, n)
    layer.weight.data *= torch.rand(n, 1) * 4
    return layer


@pytest.mark.parametrize("weight,group,activation", CONFIGS)
def test_fake_quant_layer_computes_the_kernel_numerics(weight, group, activation):
    """OBSERVE computes with the numerics' scales: the same weight as dequantize(quantize_weight(w)), bit for bit."""
    base = linear()
    layer = FakeQuantLinear.from_linear(base, weight=weight, group_size=group, activation=activation)
    assert layer.weight is base.weight and layer.bias is base.bias
    x = torch.randn(5, 128)
    torch.testing.assert_close(layer(x), base(x))  # OFF: a plain linear
    layer.set_phase(OBSERVE)
    scheme = layer.scheme
    deq = dequantize_weight(*quantize_weight(base.weight.detach(), scheme, layer.group_size), scheme=scheme, group_size=layer.group_size)
    xq = x
    if activation:
        codes, scale = quantize_activation(x)
        xq = codes.float() * scale[:, None]
    assert torch.equal(layer(x), F.linear(xq, deq, base.bias))


def test_straight_through_gradients_and_lsq_scale_gradient():
    w = (torch.randn(4, 32) * 2).requires_grad_(True)
    scales = torch.full((4, 1), 0.25, requires_grad=True)  # small enough that the clamp bites on some weights
    out = fake_quantize_weight(w, "int4", 32, scales)
    grad = torch.randn_like(out)
    out.backward(grad)
    v = w.detach() / 0.25
    qmin, qmax = qrange("int4")
    inside = (torch.round(v) >= qmin) & (torch.round(v) <= qmax)
    assert 0 < inside.sum() < inside.numel()
    assert torch.equal(w.grad, torch.where(inside, grad, torch.zeros_like(grad)))  # identity inside, zero outside
    lsq = torch.where(inside, torch.round(v) - v, torch.round(v).clamp(qmin, qmax))  # d(q·s)/ds of LSQ
    torch.testing.assert_close(scales.grad[:, 0], (grad * lsq).sum(-1))

    x = (torch.randn(3, 64) * 3).requires_grad_(True)
    fake_quantize_activation(x).sum().backward()
    codes = torch.round(x.detach() / weight_qparams(x.detach(), "int8")[0])
    assert torch.equal(x.grad, ((codes >= -128) & (codes <= 127)).float())


@pytest.mark.parametrize("weight,group,activation", CONFIGS)
@pytest.mark.parametrize("phase", [OBSERVE, FROZEN])
def test_converted_model_matches_the_fake_quantized_model(weight, group, activation, phase):
    model = make_tiny_target(num_layers=2)
    layers = prepare_qat(model, weight, group, activation, learn_scales=phase == FROZEN)
    if phase == FROZEN:
        for layer in layers:
            layer.set_phase(FROZEN)
            layer.weight_scale.data *= 1 + 0.3 * torch.rand_like(layer.weight_scale)  # as if learned
    else:
        for layer in layers:
            layer.set_phase(OBSERVE)
    ids = torch.randint(0, 49152, (2, 12))
    with torch.no_grad():
        fake = model(ids).logits
    report = convert(model)
    assert len(report["converted"]) == 2 * 7 and report["bytes_after"] < report["bytes_before"] / 3
    assert not any(isinstance(m, FakeQuantLinear) for m in model.modules())
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantizedLinear)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, fake, rtol=1e-4, atol=1e-4)


def tiny_module(tokenizer, **kwargs):
    torch.manual_seed(0)
    return DraftDistillationModule(target=make_tiny_target(), draft={"num_layers": 2}, tokenizer=tokenizer, **kwargs)


class Recorder(Callback):
    """Per step: loss, the layers' phase, a scale of the first fake-quantized layer; stateful, so resumed runs keep the steps before the break."""

    def __init__(self):
        self.losses, self.phases, self.scales = [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        layer = pl_module.draft.model.layers[0].self_attn.q_proj
        self.losses.append(outputs["loss"].item())
        self.phases.append(layer.phase)
        self.scales.append(layer.weight_scale[0, 0].item())

    def state_dict(self):
        return {"losses": self.losses, "phases": self.phases, "scales": self.scales}

    def load_state_dict(self, state):
        self.losses, self.phases, self.scales = state["losses"], state["phases"], state["scales"]


def test_schedule_off_observe_frozen(tokenizer, qa_datamodule, make_trainer):
    recorder = Recorder()
    qat = QATScheduler(weight="int4", group_size=32, start_step=2, freeze_step=4)
    module = tiny_module(tokenizer)
    trainer = make_trainer(max_steps=6, callbacks=[qat, recorder], log_every_n_steps=1)
    trainer.fit(module, datamodule=qa_datamodule())
    assert recorder.phases == [OFF, OFF, OBSERVE, OBSERVE, FROZEN, FROZEN]
    assert recorder.scales[2] != recorder.scales[3]  # observed scales follow the weights
    assert recorder.scales[4] == recorder.scales[5]  # frozen
    assert trainer.callback_metrics["qat/phase"] == FROZEN
    assert len(qat.layers) == 14 and not any("lm_head" in n for n, m in module.named_modules() if isinstance(m, FakeQuantLinear))


def test_learned_scales_train_in_their_own_group_under_one_cycle(tokenizer, qa_datamodule, make_trainer):
    recorder = Recorder()
    qat = QATScheduler(weight="int4_asym", group_size=32, activation="int8", start_step=1, learn_scales=True, scale_lr=1e-3)
    scheduler = lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=10)  # noqa: E731
    module = tiny_module(tokenizer, lr_scheduler=scheduler)
    trainer = make_trainer(max_steps=5, callbacks=[qat, recorder])
    trainer.fit(module, datamodule=qa_datamodule())
    assert recorder.phases == [OFF, FROZEN, FROZEN, FROZEN, FROZEN]  # learned scales start from the statistics
    assert len(set(recorder.scales[1:])) == 4  # and move
    groups = trainer.optimizers[0].param_groups
    assert len(groups) == 2 and groups[1]["lr"] == 1e-3 and groups[1]["weight_decay"] == 0
    assert {id(p) for p in groups[1]["params"]} == {id(layer.weight_scale) for layer in qat.layers}
    assert not any(id(layer.weight_scale) in {id(p) for p in groups[0]["params"]} for layer in qat.layers)


def test_a_trained_model_teaches_its_own_fake_quantized_copy(tokenizer, qa_datamodule, make_trainer):
    """The README's recipe for quantizing a trained model: its fp copy is the teacher, so the loss is 0 until fake
    quantization starts, then measures what quantization changed; the teacher stays as it was."""
    torch.manual_seed(0)
    draft = build_draft(make_tiny_target(), num_layers=2)
    teacher = copy.deepcopy(draft)
    before = copy.deepcopy(teacher.state_dict())
    module = DraftDistillationModule(target=teacher, draft=draft, tokenizer=tokenizer, loss="fkl")
    recorder = Recorder()
    trainer = make_trainer(max_steps=6, callbacks=[QATScheduler(weight="int4", group_size=32, start_step=2, freeze_step=4), recorder])
    trainer.fit(module, datamodule=qa_datamodule())
    assert recorder.phases == [OFF, OFF, OBSERVE, OBSERVE, FROZEN, FROZEN]
    assert max(recorder.losses[:2]) < 1e-6 < min(recorder.losses[2:])
    assert not any(isinstance(m, FakeQuantLinear) for m in teacher.modules())
    torch.testing.assert_close(teacher.state_dict(), before, rtol=0, atol=0)


RESUMES = {
    "observe": dict(start_step=1, freeze_step=None),
    "off_to_frozen": dict(start_step=4, freeze_step=5),
    "frozen": dict(start_step=0, freeze_step=2),
    "learned": dict(start_step=1, learn_scales=True, scale_lr=5e-3),
}


@pytest.mark.parametrize("schedule", list(RESUMES))
def test_resume_in_any_phase_replays_the_uninterrupted_run(tmp_path, tokenizer, qa_datamodule, make_trainer, schedule):
    def run(steps, ckpt_path=None, save=False):
        recorder = Recorder()
        callbacks = [QATScheduler(weight="int4", group_size=32, **RESUMES[schedule]), recorder]
        if save:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1))
        trainer = make_trainer(max_steps=steps, callbacks=callbacks, enable_checkpointing=save)
        trainer.fit(tiny_module(tokenizer), datamodule=qa_datamodule(n=24), ckpt_path=ckpt_path)
        return recorder

    uninterrupted = run(6)
    run(3, save=True)
    (ckpt,) = (tmp_path / "ckpt").glob("*.ckpt")
    resumed = run(6, ckpt_path=ckpt)
    assert resumed.phases == uninterrupted.phases
    assert resumed.scales == uninterrupted.scales
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(uninterrupted.losses), rtol=1e-5, atol=0)


def test_fit_twice_validate_test_and_convert_at_fit_end(tmp_path, tokenizer, qa_datamodule, make_trainer):
    qat = QATScheduler(weight="int4", group_size=32, start_step=0, freeze_step=1, convert_on_fit_end=True)
    module = tiny_module(tokenizer)
    data = qa_datamodule()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = make_trainer(max_steps=3, callbacks=[qat, checkpoint], enable_checkpointing=True, limit_val_batches=2)
    before = trainer.validate(module, datamodule=data)[0]["val/loss"]
    trainer.fit(module, datamodule=data)
    assert isinstance(qat.converted.model.layers[0].mlp.up_proj, QuantizedLinear)
    assert isinstance(module.draft.model.layers[0].mlp.up_proj, FakeQuantLinear)  # the trained module stays trainable

    # the converted copy computes what the fake-quantized draft computes
    ids = torch.randint(0, 49152, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(qat.converted(ids).logits, module.draft(ids).logits, rtol=1e-4, atol=1e-4)

    after = trainer.validate(module, datamodule=data)[0]["val/loss"]
    assert after != before
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    fresh = make_trainer(callbacks=[QATScheduler(weight="int4", group_size=32, start_step=0, freeze_step=1)], limit_val_batches=2)
    fresh_module = tiny_module(tokenizer)
    tested = fresh.validate(fresh_module, datamodule=data, ckpt_path=ckpt)[0]["val/loss"]
    assert tested == pytest.approx(after, rel=1e-6)  # the checkpoint's frozen scales, not fresh statistics
    assert fresh_module.draft.model.layers[0].mlp.up_proj.phase == FROZEN

    trainer = make_trainer(max_steps=5, callbacks=[qat, checkpoint], enable_checkpointing=True)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt)  # fit again, from where the first fit ended
    assert trainer.global_step == 5 and len(trainer.optimizers[0].param_groups) == 1


def test_yaml_config(tmp_path, tiny_dir, write_jsonl):
    from conftest import qa_records
    from lightning_spec.cli import build_cli

    data = write_jsonl(qa_records(12))
    cli = build_cli([
        "fit", "--model=lightning_spec.DraftDistillationModule", f"--model.target={tiny_dir}", "--model.draft={num_layers: 1}",
        "--data=lightning_spec.DistillDataModule", f"--data.train_files={data}", "--data.source=fixed", "--data.val_size=2",
        f"--data.cache_dir={tmp_path / 'cache'}", "--data.batch_size=2",
        "--trainer.callbacks+=lightning_spec.QATScheduler", "--trainer.callbacks.weight=int8", "--trainer.callbacks.activation=int8",
        "--trainer.callbacks.learn_scales=true", "--trainer.max_steps=2", "--trainer.logger=false",
        "--trainer.enable_checkpointing=false", f"--trainer.default_root_dir={tmp_path}",
    ], run=True)
    (qat,) = [c for c in cli.trainer.callbacks if isinstance(c, QATScheduler)]
    assert qat.layers[0].scheme == "w8a8" and qat.layers[0].learn_scales and cli.trainer.global_step == 2


@pytest.mark.parametrize("kwargs,match", [
    (dict(weight="int3"), "unknown weight scheme 'int3'"),
    (dict(weight="int4", group_size=48), "group_size must be one of"),
    (dict(activation="fp8"), "activation must be None or 'int8'"),
    (dict(start_step=5, freeze_step=3), r"freeze_step \(3\) must be >= start_step \(5\)"),
    (dict(scale_lr=1e-3), "scale_lr is set but learn_scales=False"),
    (dict(start_step=-1), "start_step must be >= 0"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        QATScheduler(**kwargs)


@pytest.mark.parametrize("qat,match", [
    (QATScheduler(include=["q_proj", "nothing_like_this"]), "include pattern 'nothing_like_this' matches no nn.Linear"),
    (QATScheduler(exclude=["lm_head", "vision_tower"]), "exclude pattern 'vision_tower' matches no module"),
    (QATScheduler(group_size=128, include=["q_proj"]), r"group_size 128 does not divide in_features 64 of layer 'draft.model.layers.0.self_attn.q_proj'"),
])
def test_bad_setup_is_named(tokenizer, qa_datamodule, make_trainer, qat, match):
    with pytest.raises(MisconfigurationException, match=match):
        make_trainer(callbacks=[copy.deepcopy(qat)]).fit(tiny_module(tokenizer), datamodule=qa_datamodule())


def test_learn_scales_needs_trainable_layers(tokenizer, qa_datamodule, make_trainer):
    module = tiny_module(tokenizer)
    module.draft.requires_grad_(False)
    with pytest.raises(MisconfigurationException, match="every selected layer's weight is frozen"):
        make_trainer(callbacks=[QATScheduler(learn_scales=True)]).fit(module, datamodule=qa_datamodule())
