"""QATScheduler: quantization-aware training of any lightning-spec module (a draft, a target), resumable in any phase."""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Sequence

import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_spec.callbacks.export_hf import trained_model
from lightning_spec.quant.fake import DEFAULT_EXCLUDE, FROZEN, OBSERVE, OFF, PHASES, FakeQuantLinear, convert, prepare_qat
from lightning_spec.quant.numerics import GROUP_SIZES


class QATScheduler(Callback):
    """Fake-quantize the module's linear layers with the exact numerics of ``lightning_spec.quant`` and schedule it.

    Steps before ``start_step`` train in full precision (torchtune's ``fake_quant_after_n_steps``); from there the
    forward pass computes with quantized weights (``weight`` scheme, ``group_size``) and, with ``activation="int8"``,
    per-token int8 activations. Scales follow the weights until ``freeze_step`` (never, if None), then are fixed;
    with ``learn_scales`` they are then trained as parameters (LSQ) in their own optimizer group (lr ``scale_lr``,
    default the first group's; no weight decay; constant, outside the LR schedule).

    The layers are swapped in ``setup``, before Lightning restores a checkpoint, so a checkpoint from any phase
    resumes in that phase with the same scales (each layer's phase and scales are in the model's state dict; the
    callback's state holds the phase too). ``lightning_spec.quant.convert`` turns the trained model into
    QuantizedLinear kernels; ``convert_on_fit_end`` does it on a copy at fit end (``self.converted``), leaving the
    module trainable, so fit can run again and ``validate``/``test(ckpt_path=...)`` keep working.

    Logs ``qat/phase`` (0 off, 1 observe, 2 frozen).

    Example::

        trainer = Trainer(callbacks=[QATScheduler(weight="int4", group_size=32, start_step=100, freeze_step=200)])
        trainer.fit(DraftDistillationModule(target="smollm2-135m-instruct"), datamodule=DistillDataModule())
    """

    def __init__(
        self,
        weight: str = "int4",
        group_size: Optional[int] = 32,
        activation: Optional[str] = None,
        include: Optional[Sequence[str]] = None,
        exclude: Sequence[str] = DEFAULT_EXCLUDE,
        start_step: int = 0,
        freeze_step: Optional[int] = None,
        learn_scales: bool = False,
        scale_lr: Optional[float] = None,
        convert_on_fit_end: bool = False,
    ):
        if weight not in ("int8", "int4", "int4_asym"):
            raise MisconfigurationException(f"QATScheduler: unknown weight scheme {weight!r}; choose 'int8', 'int4' or 'int4_asym'")
        if weight.startswith("int4") and group_size not in GROUP_SIZES:
            raise MisconfigurationException(f"QATScheduler: group_size must be one of {list(GROUP_SIZES)} for {weight}, got {group_size!r}")
        if activation not in (None, "int8"):
            raise MisconfigurationException(f"QATScheduler: activation must be None or 'int8', got {activation!r}")
        if start_step < 0:
            raise MisconfigurationException(f"QATScheduler: start_step must be >= 0, got {start_step}")
        if freeze_step is not None and freeze_step < start_step:
            raise MisconfigurationException(f"QATScheduler: freeze_step ({freeze_step}) must be >= start_step ({start_step})")
        if scale_lr is not None and not learn_scales:
            raise MisconfigurationException("QATScheduler: scale_lr is set but learn_scales=False")
        if scale_lr is not None and scale_lr <= 0:
            raise MisconfigurationException(f"QATScheduler: scale_lr must be > 0, got {scale_lr}")
        self.weight, self.group_size, self.activation = weight, group_size if weight.startswith("int4") else None, activation
        self.include = list(include) if include is not None else None
        self.exclude = list(exclude)
        # learned scales start from the statistics when observation ends: at start_step unless told otherwise
        self.start_step, self.freeze_step = start_step, start_step if learn_scales and freeze_step is None else freeze_step
        self.learn_scales, self.scale_lr, self.convert_on_fit_end = learn_scales, scale_lr, convert_on_fit_end
        self.phase = OFF
        self.layers: List[FakeQuantLinear] = []
        self.converted: Optional[torch.nn.Module] = None
        self.convert_report: Optional[Dict[str, Any]] = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(weight=self.weight, group_size=self.group_size, activation=self.activation)

    def phase_at(self, step: int) -> int:
        if step < self.start_step:
            return OFF
        if self.freeze_step is None or step < self.freeze_step:
            return OBSERVE
        return FROZEN

    def setup(self, trainer, pl_module, stage: str) -> None:
        try:
            self.layers = prepare_qat(
                pl_module, self.weight, self.group_size, self.activation, self.include, self.exclude,
                learn_scales=self.learn_scales, phase=self.phase_at(trainer.global_step),
            )
        except ValueError as err:
            raise MisconfigurationException(f"QATScheduler: {err}") from err
        if self.learn_scales:
            if not any(layer.weight.requires_grad for layer in self.layers):
                raise MisconfigurationException("QATScheduler: learn_scales=True, but every selected layer's weight is frozen")
            for layer in self.layers:  # out of configure_optimizers' parameters and DDP's buckets: they get their own group
                layer.weight_scale.requires_grad_(False)
        rank_zero_info(f"QATScheduler: {len(self.layers)} layers fake-quantized ({self.weight}"
                       f"{f' g{self.group_size}' if self.group_size else ''}{', int8 activations' if self.activation else ''})")

    def on_fit_start(self, trainer, pl_module) -> None:
        if not self.learn_scales:
            return
        if not trainer.optimizers:
            raise MisconfigurationException("QATScheduler: learn_scales=True needs an optimizer, and the module configured none")
        optimizer = trainer.optimizers[0]
        scales = [layer.weight_scale for layer in self.layers]
        known = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if not any(id(s) in known for s in scales):
            # Scheduler bookkeeping copied from the first group with every *lr key set to the scale lr: OneCycleLR and
            # CyclicLR then anneal it between equal values, and schedulers with per-group lists leave it alone.
            lr = self.scale_lr or optimizer.param_groups[0]["lr"]
            group = {k: (lr if k.endswith("lr") else v) for k, v in optimizer.param_groups[0].items() if k != "params"}
            optimizer.add_param_group({**group, "params": scales, "weight_decay": 0.0})
        for scale in scales:
            scale.requires_grad_(True)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        phase = self.phase_at(trainer.global_step)
        if phase != self.phase or any(layer.phase != phase for layer in self.layers):
            for layer in self.layers:
                layer.set_phase(phase)
            if phase != self.phase:
                rank_zero_info(f"QATScheduler: step {trainer.global_step}, phase {PHASES[phase]}")
            self.phase = phase
        pl_module.log("qat/phase", float(phase), on_step=True, on_epoch=False, batch_size=1)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # Scales are not in DDP's buckets (their requires_grad changes with the phase): average their gradients here.
        if not self.learn_scales or trainer.world_size == 1:
            return
        for layer in self.layers:
            grad = layer.weight_scale.grad
            if grad is not None:
                grad.copy_(trainer.strategy.reduce(grad, reduce_op="mean"))

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.convert_on_fit_end:
            self.converted = copy.deepcopy(trained_model(pl_module))
            self.convert_report = convert(self.converted)
            rank_zero_info(f"QATScheduler: converted {len(self.convert_report['converted'])} layers to QuantizedLinear "
                           f"({self.convert_report['bytes_before'] / 2**20:.1f} -> {self.convert_report['bytes_after'] / 2**20:.1f} MiB)")

    def state_dict(self) -> Dict[str, Any]:
        return {"phase": self.phase}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.phase = state_dict["phase"]
