"""Train the tiny draft for a few steps and write, per rank, the logged train/loss and token count of each step
(and, from rank 0, the final draft weights). test_ddp.py runs it as a script: Lightning's DDP launcher re-runs
the script once per further rank."""
import argparse
import json
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer

from lightning_spec import DistillDataModule, DraftDistillationModule


class StepRecorder(Callback):
    def __init__(self):
        self.losses, self.tokens = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(trainer.callback_metrics["train/loss"].item())  # synced over ranks (sync_dist)
        self.tokens.append(int(batch["loss_mask"].sum()))


def train(target: str, data: str, cache: str, out: str, devices: int, batch_size: int, steps: int = 3) -> None:
    # plain SGD: Adam's per-weight normalization would hide a wrongly scaled gradient
    module = DraftDistillationModule(target=target, draft={"num_layers": 2}, optimizer=lambda p: torch.optim.SGD(p, lr=2.0))
    datamodule = DistillDataModule(train_files=data, source="fixed", val_size=2, batch_size=batch_size, max_length=128, cache_dir=cache)
    recorder = StepRecorder()
    trainer = Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=steps, callbacks=[recorder],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0,
    )
    trainer.fit(module, datamodule=datamodule)
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    (path / f"rank{trainer.global_rank}.json").write_text(json.dumps({"losses": recorder.losses, "tokens": recorder.tokens}))
    if trainer.is_global_zero:
        torch.save(module.draft.state_dict(), path / "draft.pt")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    for name in ("target", "data", "cache", "out"):
        parser.add_argument(f"--{name}", required=True)
    for name in ("devices", "batch_size"):
        parser.add_argument(f"--{name}", type=int, required=True)
    train(**vars(parser.parse_args()))
