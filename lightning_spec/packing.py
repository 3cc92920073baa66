"""Rows for causal-LM training: long documents cut into chunks, short samples packed together, and the
block-diagonal causal attention that keeps packed samples from seeing each other.

A row carries ``input_ids``, ``loss_mask`` (1 on tokens to predict) and ``position_ids``, which restart at 0
where each sample starts: that is how a batch marks its sample boundaries (`block_causal_mask`).
"""
from __future__ import annotations

from bisect import bisect_left, insort
from typing import Dict, List, Tuple

import torch

Example = Dict[str, List[int]]


def chunk_document(example: Example, max_length: int) -> List[Example]:
    """Cut a document longer than ``max_length`` into chunks of at most ``max_length`` tokens.

    Consecutive chunks share one token: a chunk's first token is context only (a row's first token has nothing
    to be predicted from), so every token of the document but its first is still predicted exactly once.

    Example::

        chunk_document({"input_ids": list(range(10)), "loss_mask": [0] + [1] * 9}, 4)  # 3 chunks: 0-3, 3-6, 6-9
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 to chunk documents, got {max_length}")
    ids, mask = example["input_ids"], example["loss_mask"]
    if len(ids) <= max_length:
        return [example]
    chunks = []
    for start in range(0, len(ids) - 1, max_length - 1):
        end = min(start + max_length, len(ids))
        chunks.append({"input_ids": ids[start:end], "loss_mask": [0] + mask[start + 1 : end]})
        if end == len(ids):
            break
    return chunks


def with_positions(example: Example) -> Example:
    """A row holding one sample."""
    return {**example, "position_ids": list(range(len(example["input_ids"])))}


def pack_examples(examples: List[Example], max_length: int) -> List[Example]:
    """Pack samples into rows of at most ``max_length`` tokens, best fit by decreasing length (few rows, little
    padding; deterministic). Each sample's positions restart at 0 and its first token is never a loss position:
    it would be predicted from the previous sample.

    Example::

        rows = pack_examples([{"input_ids": [5, 6, 7], "loss_mask": [0, 1, 1]}, {"input_ids": [8, 9], "loss_mask": [0, 1]}], 8)
        rows[0]["position_ids"]  # [0, 1, 2, 0, 1]
    """
    rows: List[List[int]] = []
    free: List[Tuple[int, int]] = []  # (tokens still free, row), sorted: the best fit is the first that fits
    for i in sorted(range(len(examples)), key=lambda i: (-len(examples[i]["input_ids"]), i)):
        n = len(examples[i]["input_ids"])
        if n > max_length:
            raise ValueError(f"a sample of {n} tokens does not fit max_length={max_length}; fit it before packing")
        slot = bisect_left(free, (n, -1))
        if slot == len(free):
            rows.append([i])
            room, row = max_length - n, len(rows) - 1
        else:
            room, row = free.pop(slot)
            rows[row].append(i)
            room -= n
        if room >= 2:  # a sample needs two tokens to have anything to learn
            insort(free, (room, row))
    return [_concatenate([examples[i] for i in row]) for row in rows]


def _concatenate(samples: List[Example]) -> Example:
    row: Example = {"input_ids": [], "loss_mask": [], "position_ids": []}
    for sample in samples:
        row["input_ids"] += sample["input_ids"]
        row["loss_mask"] += [0] + sample["loss_mask"][1:]
        row["position_ids"] += range(len(sample["input_ids"]))
    return row


def collate_rows(rows: List[Example], pad_id: int) -> Dict[str, torch.Tensor]:
    """Right-pad rows into ``input_ids``, ``attention_mask``, ``loss_mask`` and ``position_ids`` [B, T]; padding
    gets position 0, so each pad token is a sample of its own and no row of the attention mask is empty."""
    width = max(len(r["input_ids"]) for r in rows)
    batch = {
        "input_ids": torch.full((len(rows), width), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
        "loss_mask": torch.zeros((len(rows), width), dtype=torch.bool),
        "position_ids": torch.zeros((len(rows), width), dtype=torch.long),
    }
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        batch["input_ids"][i, :n] = torch.tensor(r["input_ids"])
        batch["attention_mask"][i, :n] = 1
        batch["loss_mask"][i, :n] = torch.tensor(r["loss_mask"], dtype=torch.bool)
        batch["position_ids"][i, :n] = torch.tensor(r["position_ids"])
    return batch


def is_packed(position_ids: torch.Tensor, attention_mask: torch.Tensor) -> bool:
    """Whether some row holds more than one sample (a position restarts at 0 inside its tokens)."""
    return bool(((position_ids[:, 1:] == 0) & attention_mask[:, 1:].bool()).any())


def block_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention mask [B, 1, T, T]: query t sees key s iff s <= t in the same sample (0), else the
    dtype's most negative value. Samples start where ``position_ids`` is 0."""
    sample = (position_ids == 0).long().cumsum(-1)
    T = position_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=position_ids.device).tril()
    visible = (sample[:, :, None] == sample[:, None, :]) & causal
    mask = torch.zeros(visible.shape, dtype=dtype, device=position_ids.device).masked_fill_(~visible, torch.finfo(dtype).min)
    return mask[:, None]


def attention_inputs(batch: Dict[str, torch.Tensor], dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(attention_mask, position_ids)`` for the model: the block-causal 4D mask when rows are packed, the
    plain padding mask otherwise (the model's own causal mask then does the rest)."""
    positions, attn = batch["position_ids"], batch["attention_mask"]
    if is_packed(positions, attn):
        return block_causal_mask(positions, dtype), positions
    return attn, positions
