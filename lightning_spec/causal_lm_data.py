"""CausalLMDataModule: token rows for continued pre-training (raw text) and supervised fine-tuning (chat)."""
from __future__ import annotations

from collections import Counter
from functools import partial
from typing import Any, Dict, List, Optional, Tuple, Union

import datasets
import torch

from lightning_spec.data import (
    TEXT_UNITS, TokenDataModule, fit_length, has_assistant_turn, read_records, record_kind, tokenize_record,
)
from lightning_spec.packing import chunk_document, collate_rows, pack_examples, with_positions

NO_ASSISTANT_POLICIES = ("skip", "error")


class CausalLMDataModule(TokenDataModule):
    """Token batches for `CausalLMModule`; the records decide what is learned.

    Text records (``.txt`` files, read one ``text_unit`` per record, or a ``text`` column) are documents for
    continued pre-training: EOS appended, every token learned, a document longer than ``max_length`` cut into
    chunks (sharing one token, so no text is lost). Chat records (``messages``, or ``prompt`` + ``response``)
    are for SFT: the tokenizer's chat template applied, loss on the assistant turns only; a conversation
    longer than ``max_length`` is truncated, dropped or an error (``overlong``), and one without an assistant
    turn is skipped or an error (``no_assistant``). ``pack=True`` packs samples into rows of up to ``max_length``
    tokens that the module attends block-diagonally (a packed sample never sees another). What was kept,
    skipped, truncated, chunked and packed is counted in ``stats`` and logged. Files are local (json, jsonl,
    parquet, txt) or the package's own ``builtin:chat`` and ``builtin:corpus``.

    Example::

        sft = CausalLMDataModule(train_files="builtin:chat", max_length=512, pack=True, batch_size=8)
        cpt = CausalLMDataModule(train_files=["notes/a.txt", "notes/b.txt"], text_unit="document", val_size=1)
        Trainer(max_steps=100).fit(CausalLMModule(model="smollm2-135m-instruct"), datamodule=sft)
    """

    def __init__(
        self,
        train_files: Union[str, List[str]] = "builtin:chat",
        val_files: Optional[Union[str, List[str]]] = None,
        val_size: int = 40,
        max_length: int = 1024,
        overlong: str = "truncate",
        no_assistant: str = "skip",
        pack: bool = False,
        text_unit: str = "document",
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        cache_dir: Optional[str] = None,
        tokenizer: Any = None,
    ):
        if no_assistant not in NO_ASSISTANT_POLICIES:
            raise ValueError(f"no_assistant must be one of {NO_ASSISTANT_POLICIES}, got {no_assistant!r}")
        if text_unit not in TEXT_UNITS:
            raise ValueError(f"text_unit must be one of {TEXT_UNITS}, got {text_unit!r}")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (a token and the one it predicts), got {max_length}")
        super().__init__(train_files, val_files, val_size, max_length, overlong, batch_size, num_workers, seed, cache_dir, tokenizer)
        self.save_hyperparameters(ignore=["tokenizer"])
        self.no_assistant, self.pack, self.text_unit = no_assistant, pack, text_unit

    def _read(self, files) -> datasets.Dataset:
        return read_records(files, sample_by=self.text_unit)

    def _split_key(self, name: str, raw: datasets.Dataset) -> Tuple:
        tok = self.tokenizer
        return (
            "causal_lm", raw._fingerprint, name, self.text_unit, self.max_length, self.overlong, self.no_assistant,
            self.pack, tok.name_or_path, len(tok), tok.eos_token_id, getattr(tok, "chat_template", None),
        )

    def _build_split(self, name: str, raw: datasets.Dataset) -> Tuple[datasets.Dataset, Dict[str, float]]:
        kind = record_kind(raw.column_names)
        if kind == "prompt":
            raise ValueError(
                f"the {name} records hold prompts without responses: CausalLMDataModule learns from responses or "
                "text (to have the target answer prompts, use DistillDataModule(source='target'))"
            )
        counts: Counter = Counter()
        examples = self._documents(raw, counts) if kind == "text" else self._conversations(name, raw, kind, counts)
        if not examples:
            raise ValueError(f"the {name} split has no sample with tokens to learn from ({dict(counts)})")
        counts["samples"] = len(examples)
        rows = pack_examples(examples, self.max_length) if self.pack else [with_positions(e) for e in examples]
        counts["rows"] = len(rows)
        tokens = sum(len(r["input_ids"]) for r in rows)
        stats = {f"{name}_{k}": v for k, v in counts.items()}
        if self.pack:
            stats[f"{name}_pack_fill"] = round(tokens / (len(rows) * self.max_length), 4)  # of the rows' max_length
        return datasets.Dataset.from_list(rows), stats

    def _documents(self, raw: datasets.Dataset, counts: Counter) -> List[Dict[str, List[int]]]:
        """Continued pre-training: every document, EOS-terminated, in chunks of at most ``max_length``."""
        examples = []
        for record in raw:
            if not record["text"].strip():
                counts["empty_documents"] += 1
                continue
            chunks = chunk_document(tokenize_record(self.tokenizer, record, "text"), self.max_length)
            counts["documents"] += 1
            counts["chunked_documents"] += len(chunks) > 1
            examples += chunks
        return examples

    def _conversations(self, name: str, raw: datasets.Dataset, kind: str, counts: Counter) -> List[Dict[str, List[int]]]:
        """SFT: chat-templated conversations that fit ``max_length`` (by the overlong policy), loss on assistant turns."""
        tok = self.tokenizer
        if not getattr(tok, "chat_template", None):
            raise ValueError(
                f"the {name} records are chat ({kind}) but the tokenizer {tok.name_or_path!r} has no chat template: "
                "use an instruct model's tokenizer, set tokenizer.chat_template, or give text records"
            )
        examples = []
        for i, record in enumerate(raw):
            try:
                example = self._conversation(record)
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{name} record {i}: {err}") from err
            if example is None:
                if self.no_assistant == "error":
                    raise ValueError(f"{name} record {i} has no assistant turn to learn from (no_assistant='skip' skips such records)")
                counts["skipped_no_assistant"] += 1
                continue
            n = len(example["input_ids"])
            if n > self.max_length:
                if self.overlong == "error":
                    raise ValueError(f"{name} record {i} has {n} tokens > max_length={self.max_length} (set overlong='truncate' or 'drop')")
                example = fit_length(example, self.max_length, self.overlong)
                counts["dropped_overlong" if example is None else "truncated"] += 1
                if example is None:
                    continue
            if not any(example["loss_mask"][1:]):  # its assistant tokens were all cut off
                counts["dropped_no_loss_tokens"] += 1
                continue
            examples.append(example)
        return examples

    def _conversation(self, record: Dict[str, Any]) -> Optional[Dict[str, List[int]]]:
        """One chat record tokenized, None if it has no assistant turn. Its own fields decide its kind: files that
        mix messages and prompt/response records load with the other kind's columns empty."""
        kind = record_kind([k for k, v in record.items() if v is not None])
        if kind == "text":
            raise ValueError("a text record among chat records: give continued pre-training text as its own data")
        if kind == "prompt" or not has_assistant_turn(record, kind):
            return None
        return tokenize_record(self.tokenizer, record, kind)

    def _split_stats(self) -> Dict[str, float]:
        train = self.splits["train"]
        lengths = [len(ids) for ids in train["input_ids"]]
        order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(self.seed)).tolist()
        batches = [[lengths[i] for i in order[b : b + self.batch_size]] for b in range(0, len(order), self.batch_size)]
        padded = sum(len(b) * max(b) for b in batches)
        # train_padding: the share of pad tokens in the first epoch's batches, which packing saves
        return {"train_loss_tokens": sum(sum(m) for m in train["loss_mask"]), "train_padding": round(1 - sum(lengths) / padded, 4)}

    def _collate_fn(self):
        return partial(collate_rows, pad_id=self.tokenizer.pad_token_id)
