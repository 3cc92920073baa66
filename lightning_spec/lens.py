"""A draft's head fitted in closed form: the least-squares map from the draft's final hidden states to the
target's (a "tuned lens", Belrose et al. 2023), composed with the target's head.

A draft cut from the target's first layers ends in a residual stream the target's head was never meant to read
(the untrained 4-layer cut of SmolLM2 measures α ≈ 0.08). Its head is linear after the final norm, so the best
linear translation M of the draft's normalized hidden states X into the target's Y,

    M = argmin ||X M - Y||² + λ ||M||²,   λ = ridge · mean(diag XᵀX),

folds into an untied head W_target Mᵀ at the cost of one target pass over a few batches (α 0.08 → 0.26 there).
"""
from typing import Iterable

import torch
from torch import nn
from transformers import PreTrainedModel

from lightning_spec.models import next_token_hidden


def untie_head(model: PreTrainedModel) -> None:
    """Give ``model`` an output head of its own (a copy of the tied input embeddings), saved and loaded as such."""
    head = model.get_output_embeddings()
    if head.weight is model.get_input_embeddings().weight:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    model.config.tie_word_embeddings = False
    if getattr(model.config, "text_config", None) is not None:
        model.config.text_config.tie_word_embeddings = False


@torch.no_grad()
def fit_head(draft: PreTrainedModel, target: PreTrainedModel, batches: Iterable[dict], ridge: float = 1e-3) -> torch.Tensor:
    """Set ``draft``'s (untied) head to the target's head composed with the least-squares map M from the draft's
    final normalized hidden states to the target's, over the loss positions of ``batches`` (dicts with
    ``input_ids``, ``attention_mask`` and ``loss_mask``, as the data modules give). Returns M [draft H, target H].

    Example::

        untie_head(draft)
        fit_head(draft, target, [next(iter(datamodule.train_dataloader()))])
    """
    head = draft.get_output_embeddings()
    if head.weight is draft.get_input_embeddings().weight:
        raise ValueError("fit_head needs an untied draft head: call untie_head(draft) first")
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    device = head.weight.device
    gram = cross = None
    was_training = draft.training
    draft.eval()
    try:
        for batch in batches:
            ids, attn = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            select = batch["loss_mask"][:, 1:].to(device) & attn[:, 1:].bool()
            x = next_token_hidden(draft, ids, attn, select).double()
            y = next_token_hidden(target, ids.to(target.device), attn.to(target.device), select.to(target.device)).to(device, torch.float64)
            gram = x.T @ x if gram is None else gram + x.T @ x
            cross = x.T @ y if cross is None else cross + x.T @ y
    finally:
        draft.train(was_training)
    if gram is None or not gram.diagonal().sum() > 0:
        raise ValueError("fit_head got no loss positions to fit on")
    damping = ridge * gram.diagonal().mean()
    lens = torch.linalg.solve(gram + damping * torch.eye(gram.shape[0], dtype=gram.dtype, device=device), cross)
    target_head = target.get_output_embeddings().weight.to(device=device, dtype=torch.float64)
    head.weight.copy_((target_head @ lens.T).to(head.weight.dtype))
    return lens
