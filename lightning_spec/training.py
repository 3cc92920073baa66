"""What the training modules share: optimizer and scheduler factories (from Python or YAML), frozen teachers,
and the loss normalizer that makes DDP equal one process."""
from __future__ import annotations

import importlib
from typing import Any, Callable, Dict, Iterable, Optional, Union

import torch
from torch import nn

from lightning_spec.models import next_token_logits

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_optimizer(params):
    return torch.optim.AdamW(params, lr=5e-4, weight_decay=0.0)


def import_if_path(factory):
    """LightningCLI (jsonargparse) hands a function default, or a function named in YAML, over as its import path."""
    if not isinstance(factory, str):
        return factory
    module, _, name = factory.rpartition(".")
    return getattr(importlib.import_module(module), name)


def check_dtype(name: str, dtype: Optional[str]) -> Optional[str]:
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"{name} must be one of {list(DTYPES)}, got {dtype!r}")
    return dtype


def freeze(model: nn.Module, dtype: Optional[str] = None) -> nn.Module:
    """Eval mode, no gradients, optionally another precision: a teacher that only scores."""
    if dtype is not None:
        model.to(DTYPES[dtype])
    return model.eval().requires_grad_(False)


@torch.no_grad()
def frozen_logits(model: nn.Module, input_ids, attention_mask, select, position_ids=None) -> torch.Tensor:
    """A frozen model's float logits at the ``select`` positions; the model follows the batch to its device
    (it is no registered submodule, so Lightning does not move it)."""
    if next(model.parameters()).device != input_ids.device:
        model.to(input_ids.device)
    return next_token_logits(model, input_ids, attention_mask, select, position_ids).float()


def global_token_normalizer(trainer, count: torch.Tensor) -> torch.Tensor:
    """Loss positions per rank, averaged over the global batch: DDP's gradient mean then equals one
    process's token mean over the same global batch, however unevenly ranks' tokens fall."""
    total = trainer.strategy.reduce(count.float(), reduce_op="sum")
    return (total / trainer.world_size).clamp_min(1.0)


def optimizer_config(
    optimizer_factory: Callable, scheduler_factory: Optional[Callable], params: Union[Iterable, list]
) -> Union[torch.optim.Optimizer, Dict[str, Any]]:
    """``configure_optimizers``' answer: the optimizer, and the scheduler stepped every optimizer step."""
    optimizer = optimizer_factory(params)
    if scheduler_factory is None:
        return optimizer
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler_factory(optimizer), "interval": "step"}}
