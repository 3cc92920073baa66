"""CausalLMModule + CausalLMDataModule: SFT masking, packing boundaries, continued pre-training chunks, bad input,
KD from a teacher, resume exactness, DDP equality, export, QAT, the example YAMLs."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from causal_lm_ddp_worker import train as ddp_train
from conftest import CHAT, LossRecorder, make_tiny_target
from lightning_spec import CausalLMDataModule, CausalLMModule, DraftDistillationModule, ExportHF, QATScheduler, WarmupDecayLR
from lightning_spec.cli import build_cli
from lightning_spec.data import read_records, record_kind
from lightning_spec.models import model_from_spec
from lightning_spec.packing import attention_inputs, block_causal_mask, chunk_document, collate_rows, pack_examples

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
WORKER = Path(__file__).with_name("causal_lm_ddp_worker.py")
WORDS = "the quick brown fox jumps over a lazy dog while seven bright stars rise above quiet hills".split()


def chat_records(n: int):
    """Conversations of uneven length, every third with a second exchange."""
    records = []
    for i in range(n):
        answer = " ".join(WORDS[j % len(WORDS)] for j in range(i, i + 3 + 5 * (i % 4)))
        messages = [{"role": "user", "content": f"Question {i}: what comes next?"}, {"role": "assistant", "content": answer}]
        if i % 3 == 2:
            messages += [{"role": "user", "content": "And then?"}, {"role": "assistant", "content": WORDS[i % len(WORDS)]}]
        records.append({"messages": messages})
    return records


def documents(n: int, words: int = 40):
    return [" ".join(WORDS[(d + j) % len(WORDS)] for j in range(words + 17 * d)) for d in range(n)]


@pytest.fixture
def make_data(tmp_path, write_jsonl, tokenizer):
    def make(records=None, name="chat.jsonl", **kwargs) -> CausalLMDataModule:
        path = tmp_path / name
        if not path.exists():  # rewriting the file would change its fingerprint and so miss the cache
            write_jsonl(records if records is not None else chat_records(24), name)
        kwargs = {"val_size": 4, "batch_size": 2, "max_length": 128, "tokenizer": tokenizer, "cache_dir": str(tmp_path / "cache"), **kwargs}
        return CausalLMDataModule(train_files=str(path), **kwargs)

    return make


@pytest.fixture
def make_lm(tokenizer):
    def make(**kwargs) -> CausalLMModule:
        return CausalLMModule(**{"model": make_tiny_target(num_layers=2), "tokenizer": tokenizer, **kwargs})

    return make


def assistant_positions(tokenizer, messages):
    """Token indices inside each assistant turn's content and its end tokens, found in the rendered text."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    encoded = tokenizer(text, return_offsets_mapping=True)
    spans = [m.span(1) for m in re.finditer(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>\n)", text, re.S)]
    return encoded["input_ids"], {i for i, (a, b) in enumerate(encoded["offset_mapping"]) if any(s <= a and b <= e for s, e in spans)}


def loaded(dm: CausalLMDataModule, split: str = "train"):
    dm.setup("fit")
    return [dict(r) for r in dm.splits[split]]


# -- SFT masking ----------------------------------------------------------------------------------------------
def segments(row):
    """(start, end) of each sample in a row: a sample starts where its position is 0."""
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
    return list(zip(starts, starts[1:]))


@pytest.mark.parametrize("pack", [False, True])
def test_loss_positions_are_exactly_the_assistant_tokens(make_data, make_lm, write_jsonl, tokenizer, pack):
    """A crafted conversation, alone or packed with others: its loss positions are exactly its assistant tokens, and
    the module's loss is the cross-entropy summed over the loss positions of each sample run alone."""
    other = {"prompt": "Say yes.", "response": "Yes."}
    dm = make_data([CHAT, other, CHAT, other], val_files=write_jsonl([other], "val.jsonl"), pack=pack, max_length=256)
    rows = loaded(dm)
    assert len(rows) == (1 if pack else 4)
    ids, expected = assistant_positions(tokenizer, CHAT["messages"])
    found = [(row, a) for row in rows for a, b in segments(row) if row["input_ids"][a:b] == ids]
    assert len(found) == 2
    for row, a in found:
        assert {i - a for i, m in enumerate(row["loss_mask"][a : a + len(ids)], a) if m} == expected

    module = make_lm()
    row = rows[0]
    ce, kd, n = module._sums(collate_rows([row], tokenizer.pad_token_id), with_teacher=False)
    manual = torch.zeros(())
    with torch.no_grad():
        for a, b in segments(row):
            logits = module.model(torch.tensor([row["input_ids"][a:b]])).logits[0]
            labels = [t for t in range(a + 1, b) if row["loss_mask"][t]]
            manual += F.cross_entropy(logits[[t - a - 1 for t in labels]], torch.tensor([row["input_ids"][t] for t in labels]), reduction="sum")
    assert kd is None and n == sum(row["loss_mask"][1:])
    torch.testing.assert_close(ce.detach(), manual, rtol=1e-5, atol=1e-5)


def test_prompt_response_records_learn_the_response(make_data, tokenizer):
    (row, *_) = loaded(make_data([{"prompt": "What is 2+2?", "response": "4."}] * 3, val_size=1))
    learned = tokenizer.decode([t for t, m in zip(row["input_ids"], row["loss_mask"]) if m])
    assert learned == "4.<|im_end|>\n"


# -- packing ----------------------------------------------------------------------------------------------------
def test_pack_examples_fits_every_sample_once_with_restarting_positions():
    lengths = [9, 3, 7, 2, 5, 5, 8, 4, 6]
    examples = [{"input_ids": [100 * i + j for j in range(n)], "loss_mask": [1] * n} for i, n in enumerate(lengths)]
    rows = pack_examples(examples, 10)
    assert len(rows) == 5 and all(len(r["input_ids"]) <= 10 for r in rows)  # 49 tokens: 5 rows at best
    seen = []
    for r in rows:
        starts = [i for i, p in enumerate(r["position_ids"]) if p == 0]
        for a, b in zip(starts, starts[1:] + [len(r["input_ids"])]):
            assert r["position_ids"][a:b] == list(range(b - a))
            assert r["loss_mask"][a:b] == [0] + [1] * (b - a - 1)  # never predicted across a boundary
            seen.append(r["input_ids"][a:b])
    assert sorted(seen) == sorted(e["input_ids"] for e in examples)
    with pytest.raises(ValueError, match="does not fit max_length=4"):
        pack_examples(examples, 4)


def test_block_causal_mask():
    mask = block_causal_mask(torch.tensor([[0, 1, 2, 0, 1, 0]]), torch.float32)[0, 0]
    visible = (mask == 0).int().tolist()
    assert visible == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ]
    assert mask.min() == torch.finfo(torch.float32).min


def test_a_packed_sample_computes_what_it_computes_alone(tokenizer):
    """Block-diagonal attention and restarting positions: every packed sample's logits equal its logits run alone,
    in rows that also hold padding."""
    model = make_tiny_target(num_layers=2)
    g = torch.Generator().manual_seed(0)
    examples = [{"input_ids": torch.randint(3, 49152, (n,), generator=g).tolist(), "loss_mask": [0] + [1] * (n - 1)} for n in (11, 4, 7, 3, 9)]
    rows = pack_examples(examples, 16)
    batch = collate_rows(rows, tokenizer.pad_token_id)
    assert batch["attention_mask"].sum(1).tolist() != [16] * len(rows)  # some row is padded
    mask, positions = attention_inputs(batch, torch.float32)
    assert mask.shape == (len(rows), 1, 16, 16)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions).logits
        for r, row in enumerate(rows):
            starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
            for a, b in zip(starts, starts[1:]):
                alone = model(torch.tensor([row["input_ids"][a:b]])).logits[0]
                torch.testing.assert_close(packed[r, a:b], alone, rtol=1e-5, atol=1e-5)


def test_packing_fills_rows_and_is_logged(make_data):
    plain, packed = make_data(max_length=256), make_data(max_length=256, pack=True)
    for dm in (plain, packed):
        dm.setup("fit")
    assert plain.stats["train_rows"] == plain.stats["train_samples"] == 20
    assert packed.stats["train_samples"] == 20 and packed.stats["train_rows"] <= 7
    assert packed.stats["train_padding"] < plain.stats["train_padding"]
    assert 0.5 < packed.stats["train_pack_fill"] <= 1
    assert packed.stats["train_loss_tokens"] == plain.stats["train_loss_tokens"]


def test_packed_training_matches_unpacked_losses(make_data, make_lm, make_trainer, tokenizer):
    """Same samples, same model: the token-mean loss over all samples is the same packed or not."""
    losses = []
    for pack in (False, True):
        dm = make_data(pack=pack, batch_size=32)
        dm.setup("fit")
        batch = collate_rows([dict(r) for r in dm.splits["train"]], tokenizer.pad_token_id)
        ce, _, n = make_lm()._sums(batch, with_teacher=False)
        losses.append((ce / n).item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


# -- continued pre-training -------------------------------------------------------------------------------------
def test_documents_end_in_eos_and_long_ones_are_chunked_without_loss(tmp_path, tokenizer):
    for d, text in enumerate(documents(4, words=60)):
        (tmp_path / f"doc{d}.txt").write_text(text + "\n\nA second paragraph.\n")
    files = sorted(str(p) for p in tmp_path.glob("doc*.txt"))
    dm = CausalLMDataModule(train_files=files, val_size=1, max_length=32, tokenizer=tokenizer, cache_dir=str(tmp_path / "cache"))
    rows = loaded(dm)
    raw = dm._raw_splits()["train"]
    assert len(raw) == 3  # text_unit="document": one record per file
    assert dm.stats["train_documents"] == 3 and dm.stats["train_chunked_documents"] == 3
    assert all(len(r["input_ids"]) <= 32 for r in rows)
    # every token of every document but its first is predicted exactly once, and each document ends in EOS
    predicted = [t for r in rows for t, m in zip(r["input_ids"], r["loss_mask"]) if m]
    docs = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in raw["text"]]
    assert sorted(predicted) == sorted(t for ids in docs for t in ids[1:])
    assert sum(r["input_ids"][-1] == tokenizer.eos_token_id for r in rows) == 3

    paragraphs = CausalLMDataModule(train_files=files, text_unit="paragraph", val_size=1, tokenizer=tokenizer, cache_dir=str(tmp_path / "cache"))
    assert len(paragraphs._raw_splits()["train"]) == 7  # 4 files x 2 paragraphs, less 1 held out


def test_chunk_document():
    doc = {"input_ids": list(range(10)), "loss_mask": [0] + [1] * 9}
    chunks = chunk_document(doc, 4)
    assert [c["input_ids"] for c in chunks] == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    assert [c["loss_mask"] for c in chunks] == [[0, 1, 1, 1]] * 3
    assert chunk_document(doc, 10) == [doc]


def test_builtin_data_sets():
    chat = read_records("builtin:chat")
    assert record_kind(chat.column_names) == "messages" and len(chat) >= 200
    assert any(len(r["messages"]) > 2 for r in chat)  # some multi-turn
    corpus = read_records("builtin:corpus", sample_by="document")
    assert len(corpus) >= 10 and min(len(t) for t in corpus["text"]) > 3000


# -- bad input -----------------------------------------------------------------------------------------------------
def test_records_without_an_assistant_turn_are_counted_or_refused(make_data, write_jsonl):
    records = chat_records(10) + [{"messages": [{"role": "user", "content": "Anyone there?"}]}] * 3
    val = write_jsonl(chat_records(2), "val.jsonl")
    dm = make_data(records, val_files=val)
    dm.setup("fit")
    assert dm.stats["train_skipped_no_assistant"] == 3 and dm.stats["train_samples"] == 10
    with pytest.raises(ValueError, match=r"train record 10 has no assistant turn.*no_assistant='skip'"):
        make_data(records, val_files=val, no_assistant="error").setup("fit")


def test_tokenizer_without_chat_template_is_named(make_data, tokenizer):
    plain = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = None
    with pytest.raises(ValueError, match="has no chat template.*give text records"):
        make_data(tokenizer=plain).setup("fit")


def test_overlong_conversations(make_data, write_jsonl):
    records = chat_records(8) + [{"prompt": "long " * 200, "response": "Yes."}] * 2 + [{"prompt": "Hi", "response": "ok " * 200}] * 2
    val = write_jsonl(chat_records(2), "val.jsonl")

    def make(overlong):
        return make_data(records, val_files=val, overlong=overlong, max_length=96)

    with pytest.raises(ValueError, match="train record 8 has 2.. tokens > max_length=96"):
        make("error").setup("fit")
    drop, truncate = make("drop"), make("truncate")
    for dm in (drop, truncate):
        dm.setup("fit")
    assert drop.stats["train_dropped_overlong"] == 4 and drop.stats["train_samples"] == 8
    # truncation keeps the long answers (cut) but not the long prompts: nothing of their answers is left
    assert truncate.stats["train_truncated"] == 4 and truncate.stats["train_dropped_no_loss_tokens"] == 2
    assert truncate.stats["train_samples"] == 10


@pytest.mark.parametrize(
    "files,match",
    [
        (["empty.txt"], "is empty"),
        (["blank.txt"], "no sample with tokens to learn from.*empty_documents"),
        (["prompts.jsonl"], "prompts without responses"),
    ],
)
def test_bad_files(tmp_path, tokenizer, files, match):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n  \n")
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "p"}\n' * 3)
    dm = CausalLMDataModule(train_files=[str(tmp_path / f) for f in files], val_files=[str(tmp_path / f) for f in files],
                            tokenizer=tokenizer, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=match):
        dm.setup("fit")


@pytest.mark.parametrize(
    "kwargs,name",
    [(dict(overlong="wrap"), "overlong"), (dict(no_assistant="keep"), "no_assistant"), (dict(text_unit="page"), "text_unit"),
     (dict(max_length=1), "max_length"), (dict(batch_size=0), "batch_size"), (dict(val_size=0), "val_size")],
)
def test_bad_datamodule_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        CausalLMDataModule(**kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [(dict(kd_weight=0.5), "needs a teacher"), (dict(kd_loss="ce"), "kd_loss must be a divergence"), (dict(kd_loss="kl"), "unknown loss"),
     (dict(kd_weight=-1.0), "kd_weight"), (dict(kd_temperature=0.0), "kd_temperature"), (dict(teacher_dtype="int8"), "teacher_dtype"),
     (dict(model={"num_layers": 2}), "needs 'source'"), (dict(model=3), "model must be")],
)
def test_bad_module_arguments(make_lm, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make_lm(**kwargs)


# -- the module -----------------------------------------------------------------------------------------------------
def test_fresh_models_from_a_spec(smol_dir, tokenizer):
    draft, tok = model_from_spec({"source": str(smol_dir), "config": {"num_hidden_layers": 2}, "init": "random"})
    assert draft.config.num_hidden_layers == 2 and draft.config.vocab_size == 49152 and tok.get_vocab() == tokenizer.get_vocab()
    fresh, none = model_from_spec({"model_type": "llama", "vocab_size": 300, "hidden_size": 32, "intermediate_size": 64,
                                   "num_hidden_layers": 1, "num_attention_heads": 2})
    assert none is None and fresh.get_output_embeddings().weight.shape == (300, 32)


def test_val_ppl_is_the_token_mean_over_the_whole_split(make_data, make_lm, make_trainer, tokenizer):
    module, dm = make_lm(), make_data(batch_size=3)
    trainer = make_trainer(max_steps=1, limit_val_batches=None)
    trainer.validate(module, datamodule=dm)
    batch = collate_rows([dict(r) for r in dm.splits["val"]], tokenizer.pad_token_id)
    ce, _, n = module._sums(batch, with_teacher=False)
    val = trainer.callback_metrics
    assert val["val/loss"].item() == pytest.approx((ce / n).item(), rel=1e-5)
    assert val["val/ppl"].item() == pytest.approx(torch.exp(ce / n).item(), rel=1e-5)
    assert "val/kd" not in val


def test_kd_term_from_a_frozen_teacher(make_data, make_lm, make_trainer):
    """The teacher starts equal to the model (KD = 0), is never trained and stays out of checkpoints; the logged
    loss is CE + kd_weight x KD."""
    teacher = make_tiny_target(num_layers=2)
    module = make_lm(teacher=teacher, kd_weight=0.5, kd_loss="jsd")
    assert all(k.startswith("model.") for k in module.state_dict())
    dm = make_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    ce, kd, n = module._sums(batch, with_teacher=True)
    assert abs(kd.item()) < 1e-6 * ce.item() and ce.item() > 0  # float noise of a sum over ~300 positions
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer = make_trainer(max_steps=3, limit_val_batches=None, val_check_interval=3, check_val_every_n_epoch=None)
    trainer.fit(module, datamodule=dm)
    metrics = trainer.callback_metrics
    assert metrics["train/loss"].item() == pytest.approx(metrics["train/ce"].item() + 0.5 * metrics["train/kd"].item(), rel=1e-5)
    assert metrics["val/kd"].item() > 0
    assert not teacher.training and all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())


def test_trains_with_clipping_accumulation_bf16_and_a_warmup_schedule(make_data, make_lm, make_trainer):
    module = make_lm(optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.1),
                     lr_scheduler=lambda opt: WarmupDecayLR(opt, warmup_steps=2, total_steps=4))
    start = module.model.model.layers[0].mlp.up_proj.weight.detach().clone()
    trainer = make_trainer(max_steps=4, gradient_clip_val=1.0, accumulate_grad_batches=2, precision="bf16-mixed")
    trainer.fit(module, datamodule=make_data(pack=True))
    assert trainer.global_step == 4 and torch.isfinite(trainer.callback_metrics["train/loss"])
    assert not torch.equal(module.model.model.layers[0].mlp.up_proj.weight, start)
    groups = trainer.optimizers[0].param_groups
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0] and all(p.ndim < 2 for p in groups[1]["params"])


def test_warmup_decay_schedule():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupDecayLR(opt, warmup_steps=3, total_steps=7, decay="cosine", min_lr_ratio=0.1)
    lrs = []
    for _ in range(9):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[5] == pytest.approx(0.1 + 0.9 * 0.5) and lrs[7:] == pytest.approx([0.1, 0.1])
    linear = WarmupDecayLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0), 0, 4, decay="linear")
    assert [linear.factor(s) for s in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    with pytest.raises(ValueError, match="total_steps"):
        WarmupDecayLR(opt, warmup_steps=5, total_steps=5)


@pytest.mark.parametrize("stop", ["mid_epoch_checkpoint", "stopped_by_max_steps"])
def test_resume_replays_the_uninterrupted_run(tmp_path, make_data, make_lm, make_trainer, stop):
    """Packed data order, AdamW, the warmup schedule and the KD teacher: a restart from step 3 gives the same losses."""

    def module():
        return make_lm(teacher=make_tiny_target(seed=1, num_layers=1), kd_weight=0.3,
                       lr_scheduler=lambda opt: WarmupDecayLR(opt, warmup_steps=2, total_steps=8))

    def data():
        return make_data(chat_records(40), name="chat40.jsonl", pack=True, max_length=64)

    uninterrupted = LossRecorder()
    make_trainer(max_steps=8, callbacks=[uninterrupted]).fit(module(), datamodule=data())
    callbacks = [LossRecorder()]
    if stop == "mid_epoch_checkpoint":
        callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_train_steps=3))
    trainer = make_trainer(max_steps=3, callbacks=callbacks, enable_checkpointing=True)
    trainer.fit(module(), datamodule=data())
    if stop == "mid_epoch_checkpoint":
        (ckpt,) = (tmp_path / "ckpt").glob("*.ckpt")
    else:
        ckpt = tmp_path / "stopped.ckpt"
        trainer.save_checkpoint(ckpt)
    resumed = LossRecorder()
    trainer = make_trainer(max_steps=8, callbacks=[resumed])
    trainer.fit(module(), datamodule=data(), ckpt_path=ckpt)
    assert trainer.global_step == 8 and len(uninterrupted.losses) == len(resumed.losses) == 8
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(uninterrupted.losses), rtol=1e-5, atol=0)


def test_ddp_equals_one_process_on_the_global_batch(tmp_path, tiny_dir, write_jsonl):
    """2 ranks x batch 2 == 1 process x batch 4 (packed rows, KD on): losses, validation figures, final weights."""
    args = dict(model=str(tiny_dir), data=write_jsonl(chat_records(40)), cache=str(tmp_path / "cache"))
    ddp_train(**args, out=str(tmp_path / "single"), devices=1, batch_size=4)  # also builds the data cache the ranks share
    command = [sys.executable, str(WORKER), "--devices=2", "--batch_size=2", f"--out={tmp_path / 'ddp'}"]
    command += [f"--{k}={v}" for k, v in args.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent)}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    single = json.loads((tmp_path / "single" / "rank0.json").read_text())
    ranks = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["tokens"] != ranks[1]["tokens"]
    assert single["val_rows"] % 2 == 1  # validation falls unevenly on 2 ranks: each row must still count once
    assert [a + b for a, b in zip(ranks[0]["tokens"], ranks[1]["tokens"])] == single["tokens"]
    for rank in ranks:
        torch.testing.assert_close(torch.tensor(rank["losses"]), torch.tensor(single["losses"]), rtol=1e-5, atol=0)
        # the trained weights agree to ~1e-6, which the validation figures (ppl: an exponential) amplify
        for key, value in single["val"].items():
            assert rank["val"][key] == pytest.approx(value, rel=1e-3 if key == "val/ppl" else 1e-4)
    one, two = (torch.load(tmp_path / run / "model.pt") for run in ("single", "ddp"))
    torch.testing.assert_close(two, one, rtol=1e-5, atol=1e-6)
    start = load_file(tiny_dir / "model.safetensors")["model.layers.0.mlp.up_proj.weight"]
    assert (one["model.layers.0.mlp.up_proj.weight"] - start).abs().max() > 1e-3  # the comparison is not vacuous


def test_export_round_trip(tmp_path, make_data, make_lm, make_trainer, tokenizer):
    module = make_lm()
    make_trainer(callbacks=[ExportHF(str(tmp_path / "export"))]).fit(module, datamodule=make_data(pack=True))
    loaded_model = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    ids = torch.randint(49152, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded_model(ids).logits, module.model.eval()(ids).logits, rtol=0, atol=0)
    assert AutoTokenizer.from_pretrained(tmp_path / "export").get_vocab() == tokenizer.get_vocab()


def test_load_from_checkpoint_rebuilds_the_model_from_its_source(tmp_path, tiny_dir, make_data, make_trainer):
    module = CausalLMModule(model=str(tiny_dir), kd_loss="rkl")
    trainer = make_trainer(max_steps=1)
    trainer.fit(module, datamodule=make_data())
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    restored = CausalLMModule.load_from_checkpoint(tmp_path / "model.ckpt")
    assert restored.kd_loss == "rkl" and restored.tokenizer is not None
    for (key, value), (_, back) in zip(module.state_dict().items(), restored.state_dict().items()):
        assert torch.equal(value, back), key


def test_quantization_aware_fine_tuning(make_data, make_lm, make_trainer):
    """QATScheduler swaps the model's linear layers in setup; configure_optimizers then trains the swapped ones."""
    module = make_lm()
    qat = QATScheduler(weight="int8", start_step=1)
    trainer = make_trainer(max_steps=3, callbacks=[qat])
    trainer.fit(module, datamodule=make_data(pack=True))
    assert qat.layers and all(any(layer is m for m in module.model.modules()) for layer in qat.layers)
    trained = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert all(id(layer.weight) in trained for layer in qat.layers)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


# -- the example YAMLs ------------------------------------------------------------------------------------------------
TINY = ["--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.val_check_interval=2", "--trainer.log_every_n_steps=1",
        "--data.init_args.max_length=64", "--data.init_args.batch_size=2"]


@pytest.mark.parametrize("name", ["smollm2_sft.yaml", "smollm2_cpt.yaml"])
def test_example_runs_on_a_tiny_model(tmp_path, monkeypatch, tiny_dir, name):
    monkeypatch.chdir(tmp_path)  # the examples write under artifacts/
    cli = build_cli(["fit", "--config", str(EXAMPLES / name), f"--model.init_args.model={tiny_dir}",
                     f"--data.init_args.cache_dir={tmp_path / 'cache'}", *TINY])
    assert isinstance(cli.model, CausalLMModule) and isinstance(cli.datamodule, CausalLMDataModule)
    assert cli.trainer.global_step == 2 and "val/ppl" in cli.trainer.callback_metrics
    exported = yaml.safe_load((EXAMPLES / name).read_text())
    (export,) = [c["init_args"]["dirpath"] for c in exported["trainer"]["callbacks"] if c["class_path"].endswith("ExportHF")]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / export).config.num_hidden_layers == 4


def test_draft_pretrain_example_feeds_distillation(tmp_path, monkeypatch, tiny_dir):
    """draft_pretrain.yaml pre-trains a fresh draft-sized model from scratch and exports it; the distillation example
    takes the export as its draft."""
    monkeypatch.chdir(tmp_path)
    model = json.dumps({"source": str(tiny_dir), "config": {"num_hidden_layers": 1}, "init": "random"})
    cli = build_cli(["fit", "--config", str(EXAMPLES / "draft_pretrain.yaml"), f"--model.init_args.model={model}",
                     f"--data.init_args.cache_dir={tmp_path / 'cache'}", *TINY])
    assert cli.trainer.global_step == 2 and cli.model.model.config.num_hidden_layers == 1
    draft = tmp_path / "artifacts" / "draft_pretrained"
    distill = build_cli(["--config", str(EXAMPLES / "smollm2_draft.yaml"), f"--model.init_args.target={tiny_dir}",
                         f"--model.init_args.draft={draft}"], run=False)
    assert isinstance(distill.model, DraftDistillationModule) and distill.model.draft.config.num_hidden_layers == 1
