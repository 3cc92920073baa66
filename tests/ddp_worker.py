"""Train the tiny draft for a few steps and write, per rank, the logged train/loss and token count of each step
and its final draft weights. With --monitor, an AcceptanceRateMonitor and a ModelCheckpoint on
spec/tau run every 2 steps, and each rank also writes the spec/tau values it logged and the best score. With --qat,
a QATScheduler with learned scales fake-quantizes the draft from step 1. With --fit_head, the draft's head is fitted
(and trained) before the first step.
test_ddp.py and test_acceptance_monitor.py run it as a script: Lightning's DDP launcher re-runs the script once
per further rank."""
import argparse
import json
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_spec import DistillDataModule, DraftDistillationModule
from lightning_spec.callbacks import AcceptanceRateMonitor, QATScheduler


class StepRecorder(Callback):
    def __init__(self):
        self.losses, self.tokens, self.spec = [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(trainer.callback_metrics["train/loss"].item())  # synced over ranks (sync_dist)
        self.tokens.append(int(batch["loss_mask"].sum()))
        if "spec/tau" in trainer.callback_metrics:
            self.spec.append(trainer.callback_metrics["spec/tau"].item())


def train(target: str, data: str, cache: str, out: str, devices: int, batch_size: int, steps: int = 3, monitor: int = 0, qat: int = 0,
          fit_head: int = 0) -> None:
    # plain SGD: Adam's per-weight normalization would hide a wrongly scaled gradient
    module = DraftDistillationModule(
        target=target, draft={"num_layers": 2}, optimizer=lambda p: torch.optim.SGD(p, lr=2.0),
        fit_head_samples=6 if fit_head else 0, train_embeddings=bool(fit_head),
    )
    datamodule = DistillDataModule(train_files=data, source="fixed", val_size=2, batch_size=batch_size, max_length=128, cache_dir=cache)
    recorder = StepRecorder()
    callbacks = [recorder]
    if qat:
        callbacks.append(QATScheduler(weight="int4", group_size=32, start_step=1, learn_scales=True, scale_lr=1e-3))
    if monitor:
        checkpoint = ModelCheckpoint(dirpath=Path(out) / "ckpt", monitor="spec/tau", mode="max", every_n_train_steps=2)
        callbacks += [AcceptanceRateMonitor(prompts=[[5, 6, 7], [8, 9]], gamma=2, every_n_steps=2, max_new_tokens=4), checkpoint]
    trainer = Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=steps, callbacks=callbacks,
        logger=False, enable_checkpointing=bool(monitor), enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0,
    )
    trainer.fit(module, datamodule=datamodule)
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    record = {"losses": recorder.losses, "tokens": recorder.tokens, "spec": recorder.spec}
    if monitor:
        record["best"] = float(checkpoint.best_model_score) if checkpoint.best_model_score is not None else None
    (path / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
    torch.save(module.draft.state_dict(), path / f"draft{trainer.global_rank}.pt")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    for name in ("target", "data", "cache", "out"):
        parser.add_argument(f"--{name}", required=True)
    for name in ("devices", "batch_size"):
        parser.add_argument(f"--{name}", type=int, required=True)
    parser.add_argument("--monitor", type=int, default=0)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--qat", type=int, default=0)
    parser.add_argument("--fit_head", type=int, default=0)
    train(**vars(parser.parse_args()))
