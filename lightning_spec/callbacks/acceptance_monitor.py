"""AcceptanceRateMonitor: real speculative decoding of the module's draft against its target during training."""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Union

import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_spec.data import prompt_ids, read_records, record_kind
from lightning_spec.decoding import DecodingStats, TreeLayout, speculative_generate
from lightning_spec.metrics import functional as F

Prompts = Union[str, Sequence[str], Sequence[Sequence[int]]]


class AcceptanceRateMonitor(Callback):
    """Run the decoding engine with the module's ``draft`` against its ``target`` on a fixed prompt set and log
    what serving would see: ``spec/alpha`` (pooled per-position acceptance), ``spec/tau`` (tokens per target
    call), ``spec/accept@k`` (acceptance at draft position k), ``spec/cost_ratio`` (draft forward / target
    forward, timed), ``spec/expected_speedup`` (from alpha, gamma and c) and ``spec/best_gamma``.

    Runs at the end of every validation epoch, or every ``every_n_steps`` training steps when given. Rank 0
    decodes; the figures are broadcast so that every rank logs the same values (``ModelCheckpoint(monitor=
    "spec/tau", mode="max")`` keeps the best draft under DDP too).

    prompts: a data file (json/jsonl/parquet/text, or "builtin:prompts") whose records become chat prompts with
    the module's tokenizer, a list of strings (user messages), or a list of token-id lists. ``num_prompts`` caps
    how many are used (the first ones); ``batch_size`` prompts decode together.

    Example::

        Trainer(callbacks=[AcceptanceRateMonitor(prompts="builtin:prompts", num_prompts=8, gamma=4),
                           ModelCheckpoint(monitor="spec/tau", mode="max")])
    """

    def __init__(
        self,
        prompts: Prompts = "builtin:prompts",
        gamma: int = 4,
        every_n_steps: Optional[int] = None,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        tree: Optional[List[int]] = None,
        top_p: float = 1.0,
        num_prompts: Optional[int] = 8,
        batch_size: int = 8,
        seed: int = 0,
    ):
        if not isinstance(gamma, int) or gamma < 1:
            raise MisconfigurationException(f"gamma must be an integer >= 1, got {gamma!r}")
        if every_n_steps is not None and (not isinstance(every_n_steps, int) or every_n_steps < 1):
            raise MisconfigurationException(f"every_n_steps must be None or an integer >= 1, got {every_n_steps!r}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise MisconfigurationException(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if not 0 <= temperature < math.inf or not 0 < top_p <= 1:
            raise MisconfigurationException(f"need a finite temperature >= 0 and 0 < top_p <= 1, got {temperature!r}, {top_p!r}")
        if num_prompts is not None and num_prompts < 1 or batch_size < 1:
            raise MisconfigurationException("num_prompts and batch_size must be >= 1")
        if isinstance(prompts, (list, tuple)) and len(prompts) == 0:
            raise MisconfigurationException("prompts is empty")
        try:
            self.layout = TreeLayout.from_parents(tree) if tree is not None else None
        except ValueError as err:
            raise MisconfigurationException(str(err)) from err
        self.prompts, self.gamma, self.every_n_steps, self.max_new_tokens = prompts, gamma, every_n_steps, max_new_tokens
        self.temperature, self.tree, self.top_p, self.num_prompts, self.batch_size, self.seed = temperature, tree, top_p, num_prompts, batch_size, seed
        self.depth = self.layout.max_depth if self.layout is not None else gamma
        self.last: Dict[str, float] = {}
        self.runs = 0
        self._ids: Optional[List[List[int]]] = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(gamma=self.gamma, tree=self.tree, every_n_steps=self.every_n_steps)

    def state_dict(self) -> dict:
        return {"runs": self.runs, "last": dict(self.last)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.runs, self.last = state_dict["runs"], dict(state_dict["last"])

    # -- prompts --------------------------------------------------------------------------------------
    def _prompt_ids(self, pl_module) -> List[List[int]]:
        if self._ids is not None:
            return self._ids
        prompts = self.prompts
        if isinstance(prompts, (list, tuple)) and all(isinstance(p, (list, tuple)) for p in prompts):
            ids = [list(map(int, p)) for p in prompts]
        else:
            tokenizer = getattr(pl_module, "tokenizer", None)
            if tokenizer is None:
                raise MisconfigurationException("AcceptanceRateMonitor: text prompts need a module with a `tokenizer`; or pass token ids")
            if isinstance(prompts, str):
                records = read_records(prompts)
                kind = record_kind(records.column_names)
                count = len(records) if self.num_prompts is None else min(self.num_prompts, len(records))
                if kind == "text":  # raw text continues as it is
                    ids = [tokenizer(records[i]["text"])["input_ids"] for i in range(count)]
                else:
                    ids = [prompt_ids(tokenizer, records[i], kind) for i in range(count)]
            else:
                ids = [prompt_ids(tokenizer, {"prompt": p}, "prompt") for p in prompts]
        ids = ids[: self.num_prompts] if self.num_prompts is not None else ids
        if not ids or any(len(p) == 0 for p in ids):
            raise MisconfigurationException("AcceptanceRateMonitor: the prompt set is empty or holds an empty prompt")
        self._ids = ids
        return ids

    # -- measuring ------------------------------------------------------------------------------------
    def measure(self, pl_module) -> Dict[str, float]:
        """Decode the prompt set once and return the figures (no logging)."""
        target, draft = getattr(pl_module, "target", None), getattr(pl_module, "draft", None)
        if target is None or draft is None:
            raise MisconfigurationException("AcceptanceRateMonitor needs a module that exposes `target` and `draft`")
        ids = self._prompt_ids(pl_module)
        device = next(draft.parameters()).device
        pad = target.generation_config.pad_token_id
        pad = pad if pad is not None else 0
        generator = torch.Generator(device=device).manual_seed(self.seed)
        shape = dict(tree=self.tree) if self.tree is not None else dict(gamma=self.gamma)
        was_training = draft.training
        draft.eval()
        runs: List[DecodingStats] = []
        try:
            for start in range(0, len(ids), self.batch_size):
                chunk = ids[start : start + self.batch_size]
                width = max(len(p) for p in chunk)
                batch = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros_like(batch)
                for r, p in enumerate(chunk):
                    batch[r, width - len(p) :], mask[r, width - len(p) :] = torch.tensor(p), 1
                out = speculative_generate(
                    target, draft, batch.to(device), self.max_new_tokens, attention_mask=mask.to(device),
                    temperature=self.temperature, top_p=self.top_p, generator=generator, **shape,
                )
                runs.append(out.stats)
        finally:
            draft.train(was_training)
        total = DecodingStats.combine(runs)
        alpha, c = total.alpha, total.cost_ratio
        figures = {
            "spec/alpha": alpha,
            "spec/tau": total.tau,
            "spec/cost_ratio": c,
            "spec/expected_speedup": F.expected_speedup(alpha, self.depth, c),
            "spec/best_gamma": float(F.optimal_gamma(alpha, c)),
        }
        figures.update({f"spec/accept@{k + 1}": a for k, a in enumerate(total.acceptance_per_position)})
        return figures

    def _run_and_log(self, trainer, pl_module) -> None:
        figures = self.measure(pl_module) if trainer.is_global_zero else None
        figures = trainer.strategy.broadcast(figures, src=0)  # every rank logs the same, nothing waits on rank 0 alone
        self.last, self.runs = figures, self.runs + 1
        for name, value in figures.items():
            pl_module.log(name, value, sync_dist=False, rank_zero_only=False)
        rank_zero_info(f"step {trainer.global_step}: spec/tau {figures['spec/tau']:.3f}, spec/alpha {figures['spec/alpha']:.3f}")

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self.every_n_steps is None and not trainer.sanity_checking:
            self._run_and_log(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps is not None and trainer.global_step % self.every_n_steps == 0:
            self._run_and_log(trainer, pl_module)
