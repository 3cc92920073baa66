import json
import os
from pathlib import Path

# Before lightning_spec resolves anything: CI caches the converted SmolLM2 under the (gitignored) repo.
os.environ.setdefault("LIGHTNING_SPEC_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "lightning_spec"))

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_spec.data import DistillDataModule
from lightning_spec.distill import DraftDistillationModule
from lightning_spec.models import load_tokenizer, resolve_source

TOPICS = ["soup", "bread", "rivers", "chess", "python", "tea", "maps", "birds", "glass", "clocks"]


# A conversation with two assistant turns.
CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Blue, like the sky."},
    ]
}


class LossRecorder(Callback):
    """Records each step's training loss; stateful, so a resumed run also restores the steps before the break."""

    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())

    def state_dict(self):
        return {"losses": list(self.losses)}

    def load_state_dict(self, state_dict):
        self.losses = list(state_dict["losses"])


def make_tiny_target(seed: int = 0, num_layers: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=2, eos_token_id=2, bos_token_id=1,
    )
    return LlamaForCausalLM(config).eval()


def qa_records(n: int):
    """Prompt/response records whose responses differ in length (uneven token counts per batch)."""
    return [
        {"prompt": f"Tell me about {TOPICS[i % 10]} number {i}.", "response": " ".join(["Sure, here is a fact."] * (1 + i % 4))}
        for i in range(n)
    ]


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    return resolve_source("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tokenizer(smol_dir):
    return load_tokenizer(smol_dir)


@pytest.fixture
def tiny_target():
    return make_tiny_target()


@pytest.fixture
def make_module(tiny_target, tokenizer):
    def make(**kwargs) -> DraftDistillationModule:
        return DraftDistillationModule(**{"target": tiny_target, "draft": {"num_layers": 2}, "tokenizer": tokenizer, **kwargs})

    return make


@pytest.fixture
def tiny_dir(tmp_path, tokenizer) -> Path:
    """The tiny target and the SmolLM2 tokenizer saved as an HF directory (a `target:` source)."""
    path = tmp_path / "tiny_target"
    make_tiny_target().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def write_jsonl(tmp_path):
    def write(records, name: str = "data.jsonl") -> str:
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        return str(path)

    return write


@pytest.fixture
def qa_datamodule(tmp_path, write_jsonl, tokenizer):
    """A fixed-response datamodule on ``n`` prompt/response records, cached under tmp_path."""

    def make(n: int = 24, **kwargs) -> DistillDataModule:
        path = tmp_path / f"qa{n}.jsonl"
        if not path.exists():  # rewriting the file would change its fingerprint and so miss the cache
            write_jsonl(qa_records(n), path.name)
        kwargs = {"val_size": 4, "batch_size": 2, "max_length": 128, "tokenizer": tokenizer, **kwargs}
        return DistillDataModule(train_files=str(path), source="fixed", cache_dir=str(tmp_path / "cache"), **kwargs)

    return make


@pytest.fixture
def make_trainer(tmp_path):
    def make(**kwargs) -> Trainer:
        defaults = dict(
            accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path,
        )
        return Trainer(**{**defaults, **kwargs})

    return make
