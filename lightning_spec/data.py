"""Data for distillation and training: local files through `datasets`, target-generated responses,
the offline teacher cache, and a resumable, DDP-consistent sampler."""
from __future__ import annotations

import copy
import hashlib
import json
import os
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import datasets
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from lightning_spec.losses import sparse_teacher_from_logits
from lightning_spec.models import cache_root, next_token_logits
from lightning_spec.training import DTYPES, check_dtype

BUILTIN_PROMPTS = "builtin:prompts"
# The package's own data sets, named "builtin:<name>" in place of a file: the prompts (for generation), a chat
# data set (SFT) and a raw-text corpus (continued pre-training), all under lightning_spec/assets.
BUILTIN_DATA = {"prompts": "prompts.jsonl", "chat": "chat.jsonl", "corpus": "corpus/*.txt"}
_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text", ".text": "text"}
OVERLONG_POLICIES = ("error", "truncate", "drop")
TEXT_UNITS = ("document", "paragraph", "line")
_STATS_FILE = "lightning_spec_stats.json"  # the counts of a cached split's build, next to it

datasets.disable_progress_bars()


def builtin_path(name: str) -> Path:
    """The asset file (or glob pattern) behind ``builtin:<name>``."""
    if name not in BUILTIN_DATA:
        raise ValueError(f"unknown built-in data set 'builtin:{name}'; choose one of {', '.join('builtin:' + n for n in BUILTIN_DATA)}")
    return Path(str(resources.files("lightning_spec") / "assets")) / BUILTIN_DATA[name]


def builtin_prompts_path() -> Path:
    return builtin_path("prompts")


def _expand(file: Union[str, Path]) -> List[Path]:
    text = str(file)
    if not text.startswith("builtin:"):
        return [Path(text).expanduser()]
    pattern = builtin_path(text[len("builtin:"):])
    if "*" not in pattern.name:
        return [pattern]
    found = sorted(pattern.parent.glob(pattern.name))
    if not found:
        raise FileNotFoundError(f"{text}: no files match {pattern}")
    return found


def read_records(files: Union[str, Sequence[str]], sample_by: str = "line") -> datasets.Dataset:
    """Load local json/jsonl/parquet/text files (or ``builtin:<name>`` data sets) as one `datasets.Dataset`;
    clear errors for bad input. Text files give one ``text`` record per ``sample_by``: "line", "paragraph"
    (blank-line separated) or "document" (the whole file).

    Example::

        corpus = read_records("builtin:corpus", sample_by="document")
    """
    if sample_by not in TEXT_UNITS:
        raise ValueError(f"sample_by must be one of {TEXT_UNITS}, got {sample_by!r}")
    files = [files] if isinstance(files, (str, Path)) else list(files)
    if not files:
        raise ValueError("no data files given")
    paths = [p for f in files for p in _expand(f)]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"data file {p} does not exist")
        if p.suffix not in _BUILDERS:
            raise ValueError(f"data file {p}: unsupported extension {p.suffix!r} (use {', '.join(_BUILDERS)})")
        if p.stat().st_size == 0:
            raise ValueError(f"data file {p} is empty")
    builders = {_BUILDERS[p.suffix] for p in paths}
    if len(builders) != 1:
        raise ValueError(f"data files mix formats {sorted(builders)}; give one format per split")
    builder = builders.pop()
    options = {"sample_by": sample_by} if builder == "text" else {}
    try:
        ds = datasets.load_dataset(builder, data_files=[str(p) for p in paths], split="train", **options)
    except Exception as err:  # datasets raises a variety of parser errors
        raise ValueError(f"could not parse data files {[str(p) for p in paths]}: {err}") from err
    if len(ds) == 0:
        raise ValueError(f"data files {[str(p) for p in paths]} hold no records")
    return ds


def record_kind(columns: Sequence[str]) -> str:
    """'messages', 'prompt_response', 'prompt' or 'text', from a dataset's columns."""
    if "messages" in columns:
        return "messages"
    if "prompt" in columns and "response" in columns:
        return "prompt_response"
    if "prompt" in columns:
        return "prompt"
    if "text" in columns:
        return "text"
    raise ValueError(f"records need 'messages', 'prompt'(+'response') or 'text' columns; got {list(columns)}")


def _messages(record: Dict[str, Any], kind: str) -> List[Dict[str, str]]:
    if kind == "messages":
        return list(record["messages"])
    msgs = [{"role": "user", "content": record["prompt"]}]
    if kind == "prompt_response":
        msgs.append({"role": "assistant", "content": record["response"]})
    return msgs


def has_assistant_turn(record: Dict[str, Any], kind: str) -> bool:
    """Whether a chat record has an assistant turn to learn from."""
    return any(m["role"] == "assistant" for m in _messages(record, kind))


def prompt_ids(tokenizer, record: Dict[str, Any], kind: str) -> List[int]:
    """Token ids of the conversation up to (not including) its last assistant turn, ready to generate."""
    msgs = _messages(record, kind)
    if msgs and msgs[-1]["role"] == "assistant":
        msgs = msgs[:-1]
    if not msgs:
        raise ValueError("a chat record has no turn before its assistant turn")
    return _chat_ids(tokenizer, msgs, add_generation_prompt=True)


def _chat_ids(tokenizer, msgs, add_generation_prompt: bool) -> List[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; chat records (messages or "
            "prompt/response) need one: use an instruct model's tokenizer or set tokenizer.chat_template"
        )
    ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def tokenize_record(tokenizer, record: Dict[str, Any], kind: str) -> Dict[str, List[int]]:
    """``input_ids`` and ``loss_mask`` (1 on tokens the model learns to predict: assistant turns, or all text)."""
    if kind == "text":
        ids = tokenizer(record["text"])["input_ids"] + [tokenizer.eos_token_id]
        return {"input_ids": ids, "loss_mask": [0] + [1] * (len(ids) - 1)}
    if not has_assistant_turn(record, kind):
        raise ValueError("a chat record has no assistant turn to learn from")
    msgs = _messages(record, kind)
    ids: List[int] = []
    mask: List[int] = []
    for i, msg in enumerate(msgs):
        if msg["role"] != "assistant":
            continue
        before = _chat_ids(tokenizer, msgs[:i], add_generation_prompt=True)
        through = _chat_ids(tokenizer, msgs[: i + 1], add_generation_prompt=False)
        if through[: len(before)] != before or before[: len(ids)] != ids:
            raise ValueError("the chat template does not extend conversations by appending; cannot mask turns")
        mask += [0] * (len(before) - len(ids)) + [1] * (len(through) - len(before))
        ids = through
    return {"input_ids": ids, "loss_mask": mask}


def fit_length(example: Dict[str, List[int]], max_length: int, overlong: str) -> Optional[Dict[str, List[int]]]:
    """Apply the overlong policy; None means drop."""
    n = len(example["input_ids"])
    if n <= max_length:
        return example
    if overlong == "error":
        raise ValueError(f"a sample has {n} tokens > max_length={max_length} (set overlong='truncate' or 'drop')")
    if overlong == "drop":
        return None
    return {k: v[:max_length] for k, v in example.items()}


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_fingerprint(model: torch.nn.Module) -> str:
    """Identify weights cheaply: config plus a float64 checksum of every parameter."""
    with torch.no_grad():
        sums = [round(p.double().sum().item(), 6) for p in model.parameters()]
    return _fingerprint(model.config.to_dict() if hasattr(model, "config") else None, sums)


@torch.no_grad()
def generate_responses(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.7,
    top_p: float = 0.95,
    batch_size: int = 32,
    seed: int = 0,
    teacher_topk: Optional[int] = None,
    teacher_temperature: float = 1.0,
    desc: str = "generating",
) -> List[Dict[str, list]]:
    """Sample a response for each prompt with the target (batched by length, left-padded, KV cache, finished rows
    leave the batch); EOS kept. Returns one ``{"response": ids}`` per prompt; with ``teacher_topk=k`` also the
    offline teacher of the response, recorded while sampling (the target's top-k log-probs at
    ``teacher_temperature`` for each response token, the same numbers a teacher-forced pass gives) as
    ``teacher_indices``/``teacher_logprobs``, so no second pass over the data is needed."""
    from lightning_spec.decoding import target_generate  # decoding imports the models this module serves

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: List[Dict[str, list]] = [{} for _ in prompts]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    for b, start in enumerate(tqdm(range(0, len(order), batch_size), desc=desc, unit="batch")):
        idx = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for r, i in enumerate(idx):
            ids[r, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            attn[r, width - len(prompts[i]) :] = 1
        recorded: List[List[Tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in idx]

        def record(rows: List[int], logits: torch.Tensor) -> None:
            top = sparse_teacher_from_logits(logits, teacher_topk, teacher_temperature)
            for r, i, lp in zip(rows, top.indices.cpu(), top.logprobs.cpu()):
                recorded[r].append((i, lp))

        generator = torch.Generator(device).manual_seed(seed * 100_003 + b)
        gen = target_generate(
            model, ids.to(device), max_new_tokens, temperature=temperature, top_p=top_p, generator=generator,
            attention_mask=attn.to(device), eos_token_id=eos, pad_token_id=pad, logits_hook=record if teacher_topk else None,
        ).tokens[:, width:].tolist()
        for r, i in enumerate(idx):
            resp = gen[r]
            resp = resp[: resp.index(eos) + 1] if eos in resp else resp  # no EOS: it ran to max_new_tokens, unpadded
            out[i]["response"] = resp
            if teacher_topk:
                out[i]["teacher_indices"] = [t.int().tolist() for t, _ in recorded[r][: len(resp)]]
                out[i]["teacher_logprobs"] = [lp.tolist() for _, lp in recorded[r][: len(resp)]]
    model.train(was_training)
    return out


@torch.no_grad()
def teacher_topk(model, examples: datasets.Dataset, k: int, temperature: float, batch_size: int, pad_id: int):
    """The target's top-k log-probs at every loss position (position t predicts token t+1), per example."""
    device = next(model.parameters()).device
    indices, logprobs = [], []
    for start in tqdm(range(0, len(examples), batch_size), desc="teacher top-k", unit="batch"):
        rows = examples[start : start + batch_size]
        batch = collate_tokens([{"input_ids": i, "loss_mask": m} for i, m in zip(rows["input_ids"], rows["loss_mask"])], pad_id)
        select = (batch["loss_mask"][:, 1:] & batch["attention_mask"][:, 1:].bool()).to(device)
        logits = next_token_logits(model, batch["input_ids"].to(device), batch["attention_mask"].to(device), select)
        sparse = sparse_teacher_from_logits(logits, k, temperature)
        counts = select.sum(-1).tolist()
        indices += [t.int().tolist() for t in sparse.indices.cpu().split(counts)]
        logprobs += [t.tolist() for t in sparse.logprobs.cpu().split(counts)]
    return indices, logprobs


def collate_tokens(rows: List[Dict[str, Any]], pad_id: int) -> Dict[str, torch.Tensor]:
    """Right-pad ``input_ids``/``loss_mask`` (and left-pad each row's prompt for on-policy sampling);
    stack offline-teacher top-k of all loss positions into [N, k]."""
    width = max(len(r["input_ids"]) for r in rows)
    B = len(rows)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    attn = torch.zeros((B, width), dtype=torch.long)
    loss_mask = torch.zeros((B, width), dtype=torch.bool)
    prompt_lens = [r["loss_mask"].index(1) if 1 in r["loss_mask"] else len(r["loss_mask"]) for r in rows]
    pwidth = max(prompt_lens)
    prompt = torch.full((B, pwidth), pad_id, dtype=torch.long)
    prompt_attn = torch.zeros((B, pwidth), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        attn[i, :n] = 1
        loss_mask[i, :n] = torch.tensor(r["loss_mask"], dtype=torch.bool)
        p = prompt_lens[i]
        prompt[i, pwidth - p :] = ids[i, :p]
        prompt_attn[i, pwidth - p :] = 1
    batch = {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask, "prompt_ids": prompt, "prompt_mask": prompt_attn}
    if "teacher_indices" in rows[0]:
        # Row-major over the loss positions: the order of ``logits[:, :-1][loss_mask[:, 1:]]``.
        batch["teacher_indices"] = torch.cat([torch.tensor(r["teacher_indices"], dtype=torch.long) for r in rows])
        batch["teacher_logprobs"] = torch.cat([torch.tensor(r["teacher_logprobs"], dtype=torch.float32) for r in rows])
    return batch


class ResumableSampler(DistributedSampler):
    """Seeded per-epoch shuffle, sharded so that global batch g is the same samples in any world size
    (rank r takes its slice of g), and able to skip the batches a resumed run already consumed.

    Being a ``DistributedSampler``, Lightning leaves it in place under DDP.
    """

    def __init__(self, num_samples: int, batch_size: int, *, num_replicas: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True):
        super().__init__(range(num_samples), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.batch_size = batch_size
        self.global_batch = batch_size * num_replicas
        self.num_batches = num_samples // self.global_batch
        if self.num_batches == 0:
            raise ValueError(f"{num_samples} samples cannot fill one global batch of {self.global_batch}")
        self._resume: Optional[Tuple[int, int]] = None
        self.epoch_offset = 0  # data epoch minus ``epoch``: nonzero after a resume the trainer numbers differently
        self.counter: Optional[Callable[[], int]] = None  # the trainer's count of consumed batches
        self._pass = (0, 0, 0)  # the current pass: data epoch, first global batch, ``counter()`` at its start

    def resume(self, data_epoch: int, batches: int) -> None:
        """Make the next pass, whatever epoch it is set to, continue ``data_epoch`` at batch ``batches`` (and the
        passes after it the data epochs after it): a restarted Lightning run may number its epochs otherwise."""
        self._resume = (data_epoch, batches)

    def position(self) -> Tuple[int, int]:
        """(data epoch, its global batches consumed so far), counting consumed batches with ``counter``."""
        if self._resume is not None:
            return self._resume
        epoch, first, start = self._pass
        return epoch, first + (self.counter() if self.counter else 0) - start

    def __len__(self) -> int:
        return self.num_batches * self.batch_size

    def __iter__(self) -> Iterator[int]:
        at_start = self.counter() if self.counter else 0
        if self._resume is not None:
            data_epoch, first = self._resume
            if first >= self.num_batches and at_start == 0:  # a finished epoch, and the trainer starts a fresh one
                data_epoch, first = data_epoch + 1, 0
            # else a trainer that counts the epoch's batches as consumed gets an empty pass, then the next epoch
            self.epoch_offset, self._resume = data_epoch - self.epoch, None
        else:
            first = 0  # a fresh pass
        epoch = self.epoch + self.epoch_offset
        self._pass = (epoch, first, at_start)
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        for b in range(first, self.num_batches):
            start = b * self.global_batch + self.rank * self.batch_size
            yield from order[start : start + self.batch_size]


class ShardSampler(DistributedSampler):
    """Rank r takes records r, r + world, ...: every record exactly once over the ranks (Lightning's default
    sampler pads ranks with repeated records, which would bias sums over a validation set)."""

    def __init__(self, num_samples: int, *, num_replicas: int = 1, rank: int = 0):
        super().__init__(range(num_samples), num_replicas=num_replicas, rank=rank, shuffle=False)

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, len(self.dataset), self.num_replicas))


def _save_split(ds: datasets.Dataset, stats: Dict[str, float], path: Path) -> None:
    """Write a split and the counts of its build next to it, atomically: a killed build never leaves a half cache."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    ds.save_to_disk(str(tmp))
    (tmp / _STATS_FILE).write_text(json.dumps(stats))
    tmp.rename(path)


def _load_stats(path: Path) -> Dict[str, float]:
    file = path / _STATS_FILE
    return json.loads(file.read_text()) if file.is_file() else {}


class TokenDataModule(LightningDataModule):
    """What the token data modules share: a tokenizer (given, or the trained module's), a held-out validation
    split, tokenized splits cached on disk as Arrow datasets (keyed by data and settings, with the counts of
    their build), a training order that resumes exactly from a checkpoint and gives the same global batches in
    any world size, and validation shards that cover every record once under DDP.

    Subclasses say what a split's cache key holds (`_split_key`) and how it is built (`_build_split`).
    """

    def __init__(self, train_files, val_files, val_size: int, max_length: int, overlong: str, batch_size: int,
                 num_workers: int, seed: int, cache_dir: Optional[str], tokenizer: Any):
        super().__init__()
        if overlong not in OVERLONG_POLICIES:
            raise ValueError(f"overlong must be one of {OVERLONG_POLICIES}, got {overlong!r}")
        for name, value in (("batch_size", batch_size), ("max_length", max_length)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if val_files is None and val_size < 1:
            raise ValueError("without val_files, val_size must hold out at least 1 record")
        self.train_files, self.val_files, self.val_size = train_files, val_files, val_size
        self.max_length, self.overlong = max_length, overlong
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.cache_dir = Path(cache_dir) if cache_dir else cache_root() / "data"
        self._tokenizer = tokenizer
        self.splits: Dict[str, datasets.Dataset] = {}
        self.stats: Dict[str, float] = {}
        self._resume: Optional[Dict[str, int]] = None
        self._sampler: Optional[ResumableSampler] = None

    @property
    def tokenizer(self):
        if self._tokenizer is None and self.trainer is not None:
            self._tokenizer = getattr(self.trainer.lightning_module, "tokenizer", None)
        if isinstance(self._tokenizer, str):
            from lightning_spec.models import load_tokenizer

            self._tokenizer = load_tokenizer(self._tokenizer)
        if self._tokenizer is None:
            raise ValueError(f"{type(self).__name__} needs a tokenizer: pass tokenizer= or train a module that has one")
        return self._tokenizer

    # -- building the splits ----------------------------------------------------------------------------
    def _read(self, files) -> datasets.Dataset:
        return read_records(files)

    def _raw_splits(self) -> Dict[str, datasets.Dataset]:
        train = self._read(self.train_files)
        if self.val_files is not None:
            return {"train": train, "val": self._read(self.val_files)}
        if len(train) <= self.val_size:
            raise ValueError(f"{len(train)} training records cannot spare val_size={self.val_size} for validation")
        parts = train.train_test_split(test_size=self.val_size, seed=self.seed, shuffle=True)
        return {"train": parts["train"], "val": parts["test"]}

    def _split_key(self, name: str, raw: datasets.Dataset) -> Tuple:
        raise NotImplementedError

    def _build_split(self, name: str, raw: datasets.Dataset) -> Tuple[datasets.Dataset, Dict[str, float]]:
        """The tokenized split and the counts of its build (kept, dropped, ...), named ``<split>_<what>``."""
        raise NotImplementedError

    def _split_path(self, name: str, raw: datasets.Dataset) -> Path:
        return self.cache_dir / f"{name}-{_fingerprint(*self._split_key(name, raw))}"

    def _cached_split(self, name: str, raw: datasets.Dataset) -> Path:
        """The directory of the split's cache, built first if missing."""
        path = self._split_path(name, raw)
        if not path.is_dir():
            path.parent.mkdir(parents=True, exist_ok=True)
            _save_split(*self._build_split(name, raw), path)
        return path

    def _split_stats(self) -> Dict[str, float]:
        train = self.splits["train"]
        return {"train_samples": len(train), "train_tokens": sum(sum(m) for m in train["loss_mask"]), "val_samples": len(self.splits["val"])}

    def prepare_data(self) -> None:
        """Build (or find cached) tokenized splits on disk."""
        for name, raw in self._raw_splits().items():
            self._cached_split(name, raw)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.splits:
            return
        for name, raw in self._raw_splits().items():
            path = self._cached_split(name, raw)
            self.splits[name] = datasets.load_from_disk(str(path))
            self.stats.update(_load_stats(path))
        self.stats.update(self._split_stats())
        rank_zero_info(f"data: {self.stats}")

    # -- loaders ----------------------------------------------------------------------------------------
    def _collate_fn(self) -> Callable[[List[Dict[str, Any]]], Dict[str, torch.Tensor]]:
        return partial(collate_tokens, pad_id=self.tokenizer.pad_token_id)

    def _world(self) -> Tuple[int, int]:
        return (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)

    def _loader(self, ds: datasets.Dataset, sampler) -> DataLoader:
        return DataLoader(ds, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers, collate_fn=self._collate_fn())

    def train_dataloader(self) -> DataLoader:
        world, rank = self._world()
        self._sampler = ResumableSampler(len(self.splits["train"]), self.batch_size, num_replicas=world, rank=rank, seed=self.seed)
        if self.trainer is not None:
            self._sampler.counter = lambda: self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if self._resume is not None:
            self._sampler.resume(self._resume["epoch"], self._resume["batches"])
            self._resume = None
        return self._loader(self.splits["train"], self._sampler)

    def val_dataloader(self) -> DataLoader:
        world, rank = self._world()
        return self._loader(self.splits["val"], ShardSampler(len(self.splits["val"]), num_replicas=world, rank=rank))

    def state_dict(self) -> Dict[str, int]:
        """Where the training data order stands, so a resumed run sees the same batches next."""
        if self.trainer is None or self._sampler is None:
            return {}
        # The data position, not Lightning's epoch/batch counters: a run stopped by max_steps has already counted
        # its unfinished epoch, and an epoch-end save would otherwise skip the whole next epoch.
        epoch, batches = self._sampler.position()
        return {"epoch": epoch, "batches": batches}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        if state:
            self._resume = dict(state)


class DistillDataModule(TokenDataModule):
    """Token batches for draft distillation (and for plain LM training).

    ``source="target"`` samples responses to the prompts with the target (cached on disk as an Arrow
    dataset, reused next run): ``samples_per_prompt`` responses to each training prompt (one to each
    validation prompt), each an example of its own, sampled in ``gen_dtype`` if given (a copy of the target
    in, e.g., ``"bfloat16"``: 2.1× fp32's tokens/s on a 2-core AVX-512 BF16 CPU, benchmarks/bench_generate.py;
    the recorded teacher is then that copy's). ``source="fixed"`` trains on the files' own responses or text.
    ``teacher_topk=k`` precomputes the target's top-k log-probs for the training split (offline
    teacher): training then never runs the target. The target and tokenizer come from the module being
    trained (its ``target`` and ``tokenizer``) unless given here.

    Example::

        dm = DistillDataModule(train_files=["prompts.jsonl"], source="target", batch_size=8)
        trainer.fit(DraftDistillationModule(target="smollm2-135m-instruct"), datamodule=dm)
    """

    def __init__(
        self,
        train_files: Union[str, List[str]] = BUILTIN_PROMPTS,
        val_files: Optional[Union[str, List[str]]] = None,
        val_size: int = 40,
        source: str = "target",
        max_length: int = 512,
        overlong: str = "error",
        max_new_tokens: int = 128,
        gen_temperature: float = 0.7,
        gen_top_p: float = 0.95,
        gen_batch_size: int = 32,
        samples_per_prompt: int = 1,
        gen_dtype: Optional[str] = None,
        teacher_topk: Optional[int] = None,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        cache_dir: Optional[str] = None,
        tokenizer: Any = None,
        target: Any = None,
    ):
        if source not in ("target", "fixed"):
            raise ValueError(f"source must be 'target' or 'fixed', got {source!r}")
        check_dtype("gen_dtype", gen_dtype)
        for name, value in (("max_new_tokens", max_new_tokens), ("gen_batch_size", gen_batch_size), ("samples_per_prompt", samples_per_prompt)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if samples_per_prompt != 1 and source != "target":
            raise ValueError(f"samples_per_prompt={samples_per_prompt} needs source='target' (fixed data has its own responses)")
        if teacher_topk is not None and teacher_topk < 1:
            raise ValueError(f"teacher_topk must be >= 1 or None, got {teacher_topk}")
        super().__init__(train_files, val_files, val_size, max_length, overlong, batch_size, num_workers, seed, cache_dir, tokenizer)
        self.save_hyperparameters(ignore=["tokenizer", "target"])
        self.source = source
        self.gen = dict(max_new_tokens=max_new_tokens, temperature=gen_temperature, top_p=gen_top_p, batch_size=gen_batch_size)
        self.samples_per_prompt = samples_per_prompt
        self.gen_dtype = gen_dtype
        self.teacher_topk = teacher_topk
        self._target = target

    @property
    def target(self):
        if self._target is None and self.trainer is not None:
            self._target = getattr(self.trainer.lightning_module, "target", None)
        if self._target is None:
            raise ValueError("this data needs the target model: pass target= or train a module that has one")
        return self._target

    # -- building the splits ----------------------------------------------------------------------------
    def _split_key(self, name: str, raw: datasets.Dataset) -> Tuple:
        return (
            raw._fingerprint, self.source, self.max_length, self.overlong, self.seed, name,
            (self.gen, self._samples(name), self.gen_dtype) if self.source == "target" else None,
            model_fingerprint(self.target) if self.source == "target" else None,
            self._recorded_teacher(name) and (self.teacher_topk, self._temperature),
            self.tokenizer.name_or_path, len(self.tokenizer),
        )

    def _build_split(self, name: str, raw: datasets.Dataset) -> Tuple[datasets.Dataset, Dict[str, float]]:
        kind = record_kind(raw.column_names)
        tok = self.tokenizer
        if self.source == "target":
            if kind == "text":
                raise ValueError("source='target' needs prompts (a 'prompt' or 'messages' column), not raw text")
            prompts = [prompt_ids(tok, r, kind) for r in raw]
            too_long = sum(len(p) + 1 > self.max_length for p in prompts)
            if too_long and self.overlong == "error":
                raise ValueError(f"{too_long} prompts of {name} are longer than max_length={self.max_length}")
            prompts = [p for p in prompts if len(p) + 1 <= self.max_length]
            prompts = [p for p in prompts for _ in range(self._samples(name))]
            target = self.target
            device = self.trainer.strategy.root_device if self.trainer is not None else next(target.parameters()).device
            home = next(target.parameters()).device
            sampler = target.to(device) if self.gen_dtype is None else copy.deepcopy(target).to(device, DTYPES[self.gen_dtype])
            teacher = dict(teacher_topk=self.teacher_topk, teacher_temperature=self._temperature) if self._recorded_teacher(name) else {}
            generated = generate_responses(sampler, tok, prompts, seed=self.seed + (name == "val"),
                                           desc=f"target generates {name}", **teacher, **self.gen)
            target.to(home)
            examples = []
            for p, g in zip(prompts, generated):
                r = g.pop("response")
                if r:
                    examples.append({"input_ids": p + r, "loss_mask": [0] * len(p) + [1] * len(r), **g})
        else:
            if kind == "prompt":
                raise ValueError("source='fixed' needs responses or text; prompts alone need source='target'")
            examples = [tokenize_record(tok, r, kind) for r in raw]
        fitted = [fit_length(e, self.max_length, self.overlong) for e in examples]
        kept = [e for e in fitted if e is not None and any(e["loss_mask"][1:])]
        for e in kept:  # a truncated response keeps the teacher of its kept tokens only
            for column in ("teacher_indices", "teacher_logprobs"):
                if column in e:
                    e[column] = e[column][: sum(e["loss_mask"][1:])]
        if not kept:
            raise ValueError(f"the {name} split has no sample with tokens to learn from")
        # also overlong prompts and empty responses (source='target')
        wanted = len(raw) * self._samples(name)
        return datasets.Dataset.from_list(kept), {f"{name}_dropped": wanted - len(kept)}

    def _samples(self, name: str) -> int:
        return self.samples_per_prompt if name == "train" else 1

    @property
    def _temperature(self) -> float:
        """The distillation temperature of the module being trained: the teacher cache is made at it."""
        return float(getattr(self.trainer.lightning_module, "temperature", 1.0)) if self.trainer is not None else 1.0

    def _teacher_path(self, split_path: Path) -> Path:
        key = _fingerprint(self.teacher_topk, self._temperature, model_fingerprint(self.target))
        return split_path.with_name(f"{split_path.name}-teacher-{key}")

    def _add_teacher(self, ds: datasets.Dataset) -> datasets.Dataset:
        idx, lp = teacher_topk(self.target.eval(), ds, self.teacher_topk, self._temperature, self.batch_size, self.tokenizer.pad_token_id)
        return ds.add_column("teacher_indices", idx).add_column("teacher_logprobs", lp)

    def _recorded_teacher(self, name: str) -> bool:
        """Whether the split's offline teacher is recorded while the target generates it (no separate pass)."""
        return name == "train" and bool(self.teacher_topk) and self.source == "target"

    def _cached_split(self, name: str, raw: datasets.Dataset) -> Path:
        """The split, and for training on fixed data with an offline teacher its copy with the target's top-k
        (cached too; generated data records its teacher while it is generated)."""
        path = super()._cached_split(name, raw)
        if name != "train" or not self.teacher_topk or self._recorded_teacher(name):
            return path
        tpath = self._teacher_path(path)
        if not tpath.is_dir():
            _save_split(self._add_teacher(datasets.load_from_disk(str(path))), _load_stats(path), tpath)
        return tpath

    def _split_stats(self) -> Dict[str, float]:
        stats = super()._split_stats()
        if self.teacher_topk:
            stats["teacher_bytes_per_token"] = self.teacher_topk * (4 + 4)  # int32 id + float32 log-prob
        return stats
