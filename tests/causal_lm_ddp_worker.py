"""Fine-tune the tiny model with CausalLMModule (packed chat rows, a KD term from a frozen copy) for a few steps and
write, per rank, the logged train/loss and token count of each step, the validation figures, and (from rank 0) the
final weights. test_causal_lm.py runs it as a script for 2 ranks and calls `train` in process for 1."""
import argparse
import json
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer

from lightning_spec import CausalLMDataModule, CausalLMModule


class StepRecorder(Callback):
    def __init__(self):
        self.losses, self.tokens = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(trainer.callback_metrics["train/loss"].item())  # synced over ranks (sync_dist)
        self.tokens.append(int((batch["loss_mask"][:, 1:] & batch["attention_mask"][:, 1:].bool()).sum()))


def train(model: str, data: str, cache: str, out: str, devices: int, batch_size: int, steps: int = 3) -> None:
    # plain SGD: Adam's per-weight normalization would hide a wrongly scaled gradient
    module = CausalLMModule(model=model, teacher=model, kd_weight=0.5, optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    datamodule = CausalLMDataModule(train_files=data, val_size=3, max_length=96, pack=True, batch_size=batch_size, cache_dir=cache)
    recorder = StepRecorder()
    trainer = Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=steps, callbacks=[recorder],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, val_check_interval=steps, check_val_every_n_epoch=None,
    )
    trainer.fit(module, datamodule=datamodule)
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    val = {k: trainer.callback_metrics[k].item() for k in ("val/loss", "val/ppl", "val/kd")}
    record = {"losses": recorder.losses, "tokens": recorder.tokens, "val": val, "val_rows": datamodule.stats["val_rows"]}
    (path / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
    if trainer.is_global_zero:
        torch.save(module.model.state_dict(), path / "model.pt")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    for name in ("model", "data", "cache", "out"):
        parser.add_argument(f"--{name}", required=True)
    for name in ("devices", "batch_size"):
        parser.add_argument(f"--{name}", type=int, required=True)
    train(**vars(parser.parse_args()))
