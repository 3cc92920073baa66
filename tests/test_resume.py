import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from conftest import LossRecorder, make_tiny_target
from lightning_spec.distill import DraftDistillationModule


def module(tokenizer):
    return DraftDistillationModule(
        target=make_tiny_target(), draft={"num_layers": 2}, tokenizer=tokenizer,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
    )


# records (less 4 for validation) / batch size 2 = batches per epoch: 10 puts the break mid-epoch, 4 at an epoch end
SAVES = {
    "mid_epoch_checkpoint": (24, dict(max_steps=3), dict(every_n_train_steps=3)),
    "stopped_by_max_steps": (24, dict(max_steps=3), None),
    "epoch_end_checkpoint": (12, dict(max_epochs=1, max_steps=-1), dict(every_n_epochs=1)),
}


@pytest.mark.parametrize("save", list(SAVES))
def test_resume_replays_the_uninterrupted_run(tmp_path, tokenizer, qa_datamodule, make_trainer, save):
    """Data order (datamodule state), optimizer, scheduler and callback state all survive a restart."""
    records, stop, checkpoint = SAVES[save]
    uninterrupted = LossRecorder()
    make_trainer(max_steps=6, callbacks=[uninterrupted]).fit(module(tokenizer), datamodule=qa_datamodule(n=records))

    callbacks = [LossRecorder()]
    if checkpoint:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, **checkpoint))
    trainer = make_trainer(callbacks=callbacks, enable_checkpointing=True, **stop)
    trainer.fit(module(tokenizer), datamodule=qa_datamodule(n=records))
    if checkpoint:
        (ckpt,) = (tmp_path / "ckpt").glob("*.ckpt")
    else:
        ckpt = tmp_path / "stopped.ckpt"
        trainer.save_checkpoint(ckpt)

    resumed = LossRecorder()
    trainer = make_trainer(max_steps=6, callbacks=[resumed])
    trainer.fit(module(tokenizer), datamodule=qa_datamodule(n=records), ckpt_path=ckpt)
    assert trainer.global_step == 6
    assert len(uninterrupted.losses) == len(resumed.losses) == 6
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(uninterrupted.losses), rtol=1e-5, atol=0)
