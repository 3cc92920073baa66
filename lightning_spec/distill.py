"""DraftDistillationModule: white-box distillation of a speculative-decoding draft toward a frozen target."""
from __future__ import annotations

from typing import Any, Dict, Optional, Union

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torch.utils.data import DataLoader, Subset

from lightning_spec.lens import fit_head, untie_head
from lightning_spec.losses import SparseTeacher, check_loss_name, distill_loss, fidelity_sums
from lightning_spec.metrics.functional import expected_accepted_length
from lightning_spec.models import build_draft, check_vocab_compatible, load_causal_lm, load_model, next_token_logits
from lightning_spec.training import (
    check_dtype, default_optimizer, freeze, frozen_logits, global_token_normalizer, import_if_path, optimizer_config,
)


class DraftDistillationModule(LightningModule):
    """Distill ``draft`` toward a frozen ``target`` with a DistillSpec divergence.

    The target runs in eval mode under no_grad, optionally in its own dtype, and is kept out of the
    module's state dict: checkpoints hold the draft (and optimizer) only. With an offline teacher in the
    batch (``teacher_indices``/``teacher_logprobs`` from ``DistillDataModule(teacher_topk=k)``) the target
    is not run at all. ``on_policy_fraction`` of the training steps replace the data's responses by
    continuations sampled from the current draft, scored by the target (DistillSpec's λ).

    Args:
        target: a model, or a source for ``load_causal_lm`` (embedded name, GGUF file, HF directory).
        draft: a model, an HF directory of a draft, or ``build_draft`` arguments (default ``{"num_layers": 4}``).
        loss: one of ``fkl``, ``rkl``, ``jsd``, ``tvd``, ``nla`` (-log α), ``hybrid`` (KL/TV), ``ce``.
        temperature: softmax temperature of both distributions in the loss.
        jsd_beta: β of JSD[β].
        target_dtype: ``"bfloat16"`` etc. to run the teacher in another precision than the draft.
        train_embeddings: also train the embeddings and head; off keeps them as they are.
        fit_head_samples: before the first training step, give the draft an untied head fitted in closed form on
            this many training samples (the tuned lens of `lightning_spec.lens.fit_head`); 0 keeps the target's.
        calibrate_head_samples: after the last training step (before ``on_fit_end``: FidelityReport and ExportHF
            see the result), scale the draft's untied head by the factor in 0.80, 0.85, ..., 1.60 that maximizes α
            against the teacher on this many training samples (the trained draft is too flat: +0.014 held-out α on
            the demo, at 1.25); 0 leaves it. Greedy decoding is unchanged (the argmax does not move).

    Example::

        module = DraftDistillationModule(target="smollm2-135m-instruct", draft={"layers": [0, 1, 2, 3]}, loss="fkl")
        Trainer(max_steps=300).fit(module, datamodule=DistillDataModule(teacher_topk=64))
    """

    def __init__(
        self,
        target: Union[str, nn.Module] = "smollm2-135m-instruct",
        draft: Union[str, Dict[str, Any], nn.Module, None] = None,
        loss: str = "fkl",
        temperature: float = 1.0,
        jsd_beta: float = 0.5,
        target_dtype: Optional[str] = None,
        train_embeddings: bool = False,
        fit_head_samples: int = 0,
        calibrate_head_samples: int = 0,
        on_policy_fraction: float = 0.0,
        on_policy_max_new_tokens: int = 64,
        on_policy_temperature: float = 1.0,
        seed: int = 0,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        tokenizer: Any = None,
    ):
        super().__init__()
        check_loss_name(loss)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0 < jsd_beta < 1:
            raise ValueError(f"jsd_beta must be in (0, 1), got {jsd_beta}")
        if not 0 <= on_policy_fraction <= 1:
            raise ValueError(f"on_policy_fraction must be in [0, 1], got {on_policy_fraction}")
        for name, value in (("fit_head_samples", fit_head_samples), ("calibrate_head_samples", calibrate_head_samples)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        check_dtype("target_dtype", target_dtype)
        self.save_hyperparameters(ignore=["target", "draft", "optimizer", "lr_scheduler", "tokenizer"])
        if isinstance(target, (str,)) or hasattr(target, "__fspath__"):
            target, loaded_tokenizer = load_causal_lm(target)
            tokenizer = tokenizer or loaded_tokenizer
        if isinstance(draft, (str,)) or hasattr(draft, "__fspath__"):
            draft = load_model(draft)  # the target's tokenizer is used
        elif draft is None or isinstance(draft, dict):
            draft = build_draft(target, **(draft or {"num_layers": 4}))
        check_vocab_compatible(draft, target)
        freeze(target, target_dtype)
        # Not a registered submodule: kept out of state_dict, checkpoints, DDP wrapping and .train().
        object.__setattr__(self, "target", target)
        self.draft = draft.train()
        if fit_head_samples or calibrate_head_samples:
            untie_head(self.draft)  # here, not at fit start: a checkpoint's untied head must find its own parameter
        self._head_fitted = False
        self.draft.get_input_embeddings().requires_grad_(train_embeddings)
        self.draft.get_output_embeddings().requires_grad_(train_embeddings)
        self.tokenizer = tokenizer
        self.loss_name, self.temperature, self.jsd_beta = loss, float(temperature), jsd_beta
        self.optimizer_factory, self.scheduler_factory = import_if_path(optimizer), import_if_path(lr_scheduler)
        self._val_sums: Optional[torch.Tensor] = None

    # -- forward passes ---------------------------------------------------------------------------------
    def _target_logits(self, ids, attn, select) -> torch.Tensor:
        return frozen_logits(self.target, ids, attn, select)

    def _teacher(self, batch, ids, attn, select):
        if "teacher_indices" in batch:
            return SparseTeacher(batch["teacher_indices"], batch["teacher_logprobs"])
        return self._target_logits(ids, attn, select)

    def _on_policy_step(self) -> bool:
        fraction = self.hparams.on_policy_fraction
        if fraction <= 0:
            return False
        g = torch.Generator().manual_seed(self._step_seed())
        return bool(torch.rand((), generator=g) < fraction)

    def _step_seed(self) -> int:
        """A seed fixed by (seed, global step): on-policy choices and samples replay exactly after a resume."""
        return self.hparams.seed * 1_000_003 + self.global_step

    @torch.no_grad()
    def _sample_from_draft(self, batch):
        """Replace the responses by continuations of the prompts sampled from the current draft."""
        prompt, prompt_mask = batch["prompt_ids"], batch["prompt_mask"]
        torch.manual_seed(self._step_seed())
        tok = self.tokenizer
        out = self.draft.generate(
            input_ids=prompt, attention_mask=prompt_mask, do_sample=True, top_k=None, top_p=1.0,
            temperature=self.hparams.on_policy_temperature, max_new_tokens=self.hparams.on_policy_max_new_tokens,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        )
        response = out[:, prompt.shape[1]:]
        # keep each response through its first EOS
        after_eos = (response == tok.eos_token_id).long().cumsum(-1) - (response == tok.eos_token_id).long()
        response_mask = after_eos == 0
        ids = torch.cat([prompt, response], 1)
        attn = torch.cat([prompt_mask.bool(), response_mask], 1).long()
        loss_mask = torch.cat([torch.zeros_like(prompt_mask, dtype=torch.bool), response_mask], 1)
        return ids, attn, loss_mask

    def _batch_sums(self, batch, on_policy: bool = False, fidelity: bool = True):
        """Loss summed over the batch's loss positions and their count, and (if ``fidelity``) the sums of α and
        greedy agreement there."""
        if on_policy:
            ids, attn, loss_mask = self._sample_from_draft(batch)
            batch = {k: v for k, v in batch.items() if not k.startswith("teacher_")}
        else:
            ids, attn, loss_mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
        select = loss_mask[:, 1:] & attn[:, 1:].bool()
        draft_logits = next_token_logits(self.draft, ids, attn, select)
        # plain cross-entropy needs the target only for the fidelity figures
        teacher = self._teacher(batch, ids, attn, select) if fidelity or self.loss_name != "ce" else None
        loss = distill_loss(
            draft_logits, teacher, self.loss_name, labels=ids[:, 1:][select], temperature=self.temperature,
            jsd_beta=self.jsd_beta, reduction="sum",
        )
        count = select.sum()
        if not fidelity:
            return loss, count, None
        alpha, agree, _ = fidelity_sums(draft_logits.detach(), teacher)
        return loss, count, (alpha, agree)

    # -- Lightning hooks --------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        # α and agreement cost two passes over [tokens, V]: only on the steps the logger writes
        logging = self.trainer._logger_connector.should_update_logs
        loss_sum, n, fidelity = self._batch_sums(batch, on_policy=self._on_policy_step(), fidelity=logging)
        loss = loss_sum / global_token_normalizer(self.trainer, n)
        size = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=size, sync_dist=True)
        if fidelity is not None:
            alpha, agree = fidelity
            self.log("train/alpha", alpha / n.clamp_min(1), prog_bar=True, batch_size=size, sync_dist=True)
            self.log("train/agreement", agree / n.clamp_min(1), batch_size=size, sync_dist=True)
        return loss

    def on_train_start(self):
        if self.hparams.fit_head_samples and not self._head_fitted:
            self._fit_head()

    def on_train_end(self):
        if self.hparams.calibrate_head_samples:
            self._calibrate_head()

    def _first_training_samples(self, option: str) -> DataLoader:
        """The first ``hparams[option]`` records of the training set (in the dataset's order, so every rank sees the
        same), batched and collated like training."""
        loader = self.trainer.train_dataloader
        dataset = getattr(loader, "dataset", None)
        if not isinstance(loader, DataLoader) or not hasattr(dataset, "__len__"):
            raise ValueError(f"{option} needs a training DataLoader over a sized (map-style) dataset")
        count = min(self.hparams[option], len(dataset))
        return DataLoader(Subset(dataset, range(count)), batch_size=loader.batch_size, collate_fn=loader.collate_fn)

    def _fit_head(self):
        samples = self._first_training_samples("fit_head_samples")
        rank_zero_info(f"fitting the draft's head on {len(samples.dataset)} training samples")
        fit_head(self.draft, self.target, samples)
        head = self.draft.get_output_embeddings().weight
        head.data.copy_(self.trainer.strategy.broadcast(head.data, src=0))
        self._head_fitted = True

    @torch.no_grad()
    def _calibrate_head(self):
        """Scale the head by the grid factor with the highest α against the teacher (offline top-k or the target)
        on the first ``calibrate_head_samples`` training records, in float32."""
        scales = [round(0.8 + 0.05 * i, 2) for i in range(17)]
        alpha, count = torch.zeros(len(scales), dtype=torch.float64), 0
        was_training = self.draft.training
        self.draft.eval()
        for batch in self._first_training_samples("calibrate_head_samples"):
            batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            ids, attn = batch["input_ids"], batch["attention_mask"]
            select = batch["loss_mask"][:, 1:] & attn[:, 1:].bool()
            logits = next_token_logits(self.draft, ids, attn, select).float()
            teacher = self._teacher(batch, ids, attn, select)
            for i, scale in enumerate(scales):
                alpha[i] += float(fidelity_sums(logits * scale, teacher)[0])
            count += int(select.sum())
        self.draft.train(was_training)
        if not count:
            raise ValueError("calibrate_head_samples: the samples have no loss positions")
        best = scales[int(alpha.argmax())]
        self.draft.get_output_embeddings().weight.mul_(best)
        rank_zero_info(f"scaled the draft's head by {best} (α on {count} training positions {alpha[scales.index(1.0)] / count:.3f} -> {alpha.max() / count:.3f})")

    def on_save_checkpoint(self, checkpoint):
        checkpoint["draft_head_fitted"] = self._head_fitted

    def on_load_checkpoint(self, checkpoint):
        self._head_fitted = checkpoint.get("draft_head_fitted", False)

    def on_validation_epoch_start(self):
        self._val_sums = torch.zeros(4, dtype=torch.float64, device=self.device)

    def validation_step(self, batch, batch_idx):
        loss, n, (alpha, agree) = self._batch_sums(batch)
        self._val_sums += torch.stack([loss.detach(), alpha, agree, n]).double()

    def on_validation_epoch_end(self):
        sums = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum")
        n = sums[3].clamp_min(1)
        self.log_dict({"val/loss": sums[0] / n, "val/alpha": sums[1] / n, "val/agreement": sums[2] / n}, prog_bar=True)

    @torch.no_grad()
    def measure(self, dataloader, gamma: int = 4) -> Dict[str, float]:
        """α (mean Σ min(p, q) against the live target), greedy agreement and τ at ``gamma`` over a loader."""
        was_training = self.draft.training
        self.draft.eval()
        sums = torch.zeros(3, dtype=torch.float64)
        for batch in dataloader:
            batch = {k: v.to(self.device) for k, v in batch.items() if not k.startswith("teacher_")}
            ids, attn = batch["input_ids"], batch["attention_mask"]
            select = batch["loss_mask"][:, 1:] & attn[:, 1:].bool()
            draft_logits = next_token_logits(self.draft, ids, attn, select).float()
            sums += torch.stack([s.double().cpu() for s in fidelity_sums(draft_logits, self._target_logits(ids, attn, select))])
        self.draft.train(was_training)
        alpha = (sums[0] / sums[2].clamp_min(1)).item()
        return {"alpha": alpha, "agreement": (sums[1] / sums[2].clamp_min(1)).item(), "tau": expected_accepted_length(alpha, gamma), "tokens": int(sums[2])}

    def configure_optimizers(self):
        return optimizer_config(self.optimizer_factory, self.scheduler_factory, [p for p in self.draft.parameters() if p.requires_grad])
