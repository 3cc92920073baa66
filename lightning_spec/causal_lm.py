"""CausalLMModule: continued pre-training and supervised fine-tuning of a causal LM, optionally distilled from a
frozen teacher."""
from __future__ import annotations

from typing import Any, Dict, Optional, Union

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from lightning_spec.losses import check_loss_name, distill_loss
from lightning_spec.models import check_vocab_compatible, load_causal_lm, load_tokenizer, model_from_spec, next_token_logits
from lightning_spec.packing import attention_inputs
from lightning_spec.training import (
    check_dtype, default_optimizer, freeze, frozen_logits, global_token_normalizer, import_if_path, optimizer_config,
)


class CausalLMModule(LightningModule):
    """Train ``model`` on next-token cross-entropy at the batch's loss positions (assistant turns for SFT, all
    text for continued pre-training), plus ``kd_weight`` × a divergence from a frozen ``teacher`` (the losses of
    `DraftDistillationModule`: one implementation, `lightning_spec.losses`).

    The loss is a token mean over the global batch, so DDP equals one process on the same global batch.
    Packed rows (``CausalLMDataModule(pack=True)``) are attended block-diagonally with per-sample positions.
    Logged: ``train/loss`` (the objective); ``val/loss``, the token-mean NLL over the whole validation set (all
    ranks), and ``val/ppl`` = exp(val/loss); with a teacher ``train/ce``, ``train/kd`` and ``val/kd`` (val/kd
    also at kd_weight=0: how far training moved from the teacher). The trained model is the submodule
    ``model``: what QATScheduler quantizes and ExportHF exports. The teacher runs in eval mode under no_grad
    and stays out of the state dict and checkpoints.

    Args:
        model: a model; a source for `load_causal_lm` (embedded name, GGUF file, HF directory); a dict with
            ``source`` and `build_draft` arguments, e.g. ``{"source": "smollm2-135m-instruct", "config":
            {"num_hidden_layers": 4}, "init": "random"}`` to pre-train a fresh draft-sized model from scratch;
            or config fields with ``model_type`` (see `model_from_spec`).
        teacher: None, a model or a source for `load_causal_lm`, with the model's vocabulary.
        kd_loss: the distillation divergence: ``fkl``, ``rkl``, ``jsd``, ``tvd``, ``nla`` or ``hybrid``.
        kd_weight: weight of the distillation term (0 trains on cross-entropy alone).
        kd_temperature: softmax temperature of both distributions in the distillation term (which is × T²).
        jsd_beta: β of JSD[β].
        teacher_dtype: ``"bfloat16"`` etc. to run the teacher in another precision.
        optimizer: a torch optimizer factory; 1-D parameters (norms, biases) are never weight-decayed.
        lr_scheduler: a scheduler factory, stepped every optimizer step (e.g. `WarmupDecayLR`).
        tokenizer: a tokenizer or its source; by default the model source's.

    Example::

        module = CausalLMModule(model="smollm2-135m-instruct", optimizer=lambda p: torch.optim.AdamW(p, lr=5e-5))
        Trainer(max_steps=100, gradient_clip_val=1.0).fit(module, datamodule=CausalLMDataModule(pack=True))
    """

    def __init__(
        self,
        model: Union[str, Dict[str, Any], nn.Module] = "smollm2-135m-instruct",
        teacher: Union[str, nn.Module, None] = None,
        kd_loss: str = "fkl",
        kd_weight: float = 0.0,
        kd_temperature: float = 1.0,
        jsd_beta: float = 0.5,
        teacher_dtype: Optional[str] = None,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        tokenizer: Any = None,
    ):
        super().__init__()
        if check_loss_name(kd_loss) == "ce":
            raise ValueError("kd_loss must be a divergence from the teacher (fkl, rkl, jsd, tvd, nla, hybrid), not 'ce'")
        if kd_weight < 0:
            raise ValueError(f"kd_weight must be >= 0, got {kd_weight}")
        if kd_weight > 0 and teacher is None:
            raise ValueError(f"kd_weight={kd_weight} needs a teacher")
        if kd_temperature <= 0:
            raise ValueError(f"kd_temperature must be > 0, got {kd_temperature}")
        if not 0 < jsd_beta < 1:
            raise ValueError(f"jsd_beta must be in (0, 1), got {jsd_beta}")
        check_dtype("teacher_dtype", teacher_dtype)
        # sources and specs are kept (load_from_checkpoint rebuilds the model from them), live objects are not
        live = [name for name, value in (("model", model), ("teacher", teacher), ("tokenizer", tokenizer)) if not isinstance(value, (str, dict, type(None)))]
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", *live])
        model, model_tokenizer = model_from_spec(model)
        if isinstance(tokenizer, str):
            tokenizer = load_tokenizer(tokenizer)
        self.model = model.train()
        self.tokenizer = tokenizer or model_tokenizer
        if isinstance(teacher, str) or hasattr(teacher, "__fspath__"):
            teacher, _ = load_causal_lm(teacher)
        if teacher is not None:
            check_vocab_compatible(model, teacher)
            freeze(teacher, teacher_dtype)
        # Not a registered submodule: kept out of state_dict, checkpoints, DDP wrapping, .train() and QAT's swaps.
        object.__setattr__(self, "teacher", teacher)
        self.kd_loss, self.kd_weight, self.kd_temperature, self.jsd_beta = kd_loss, float(kd_weight), float(kd_temperature), jsd_beta
        self.optimizer_factory, self.scheduler_factory = import_if_path(optimizer), import_if_path(lr_scheduler)
        self._val_sums: Optional[torch.Tensor] = None

    # -- the loss -----------------------------------------------------------------------------------------
    def _sums(self, batch, with_teacher: bool):
        """Cross-entropy summed over the batch's loss positions, the distillation divergence summed there
        (None without the teacher) and the number of positions."""
        ids = batch["input_ids"]
        select = batch["loss_mask"][:, 1:] & batch["attention_mask"][:, 1:].bool()
        mask, positions = attention_inputs(batch, next(self.model.parameters()).dtype)
        logits = next_token_logits(self.model, ids, mask, select, positions)
        ce = distill_loss(logits, None, "ce", labels=ids[:, 1:][select], reduction="sum")
        if not with_teacher:
            return ce, None, select.sum()
        mask, positions = attention_inputs(batch, next(self.teacher.parameters()).dtype)
        teacher_logits = frozen_logits(self.teacher, ids, mask, select, positions)
        kd = distill_loss(
            logits, teacher_logits, self.kd_loss, temperature=self.kd_temperature, jsd_beta=self.jsd_beta, reduction="sum"
        )
        return ce, kd, select.sum()

    # -- Lightning hooks ----------------------------------------------------------------------------------
    def on_train_start(self):
        stats = getattr(self.trainer.datamodule, "stats", None)
        if stats:
            for logger in self.loggers:
                logger.log_metrics({f"data/{k}": float(v) for k, v in stats.items()}, step=self.global_step)

    def training_step(self, batch, batch_idx):
        ce, kd, n = self._sums(batch, with_teacher=self.kd_weight > 0)
        norm = global_token_normalizer(self.trainer, n)
        loss = ce / norm if kd is None else (ce + self.kd_weight * kd) / norm
        size = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=size, sync_dist=True)
        if kd is not None:
            self.log("train/ce", ce.detach() / norm, batch_size=size, sync_dist=True)
            self.log("train/kd", kd.detach() / norm, batch_size=size, sync_dist=True)
        return loss

    def on_validation_epoch_start(self):
        self._val_sums = torch.zeros(3, dtype=torch.float64, device=self.device)

    def validation_step(self, batch, batch_idx):
        ce, kd, n = self._sums(batch, with_teacher=self.teacher is not None)
        self._val_sums += torch.stack([ce.detach(), kd.detach() if kd is not None else torch.zeros_like(ce), n]).double()

    def on_validation_epoch_end(self):
        ce, kd, n = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum")
        n = n.clamp_min(1)
        metrics = {"val/loss": ce / n, "val/ppl": torch.exp(ce / n)}
        if self.teacher is not None:
            metrics["val/kd"] = kd / n
        self.log_dict(metrics, prog_bar=True)

    def configure_optimizers(self):
        # Called after every callback's setup: the parameters of any swapped-in layers (QAT) are the ones trained.
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError("CausalLMModule: the model has no parameters that require grad")
        groups = [{"params": [p for p in params if p.ndim >= 2]}, {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        return optimizer_config(self.optimizer_factory, self.scheduler_factory, [g for g in groups if g["params"]])
