import copy
import re

import pytest
import torch

import lightning_spec.data as data
from conftest import CHAT, make_tiny_target, qa_records
from lightning_spec.data import (
    DistillDataModule, ResumableSampler, ShardSampler, collate_tokens, fit_length, prompt_ids, read_records, record_kind, tokenize_record,
)



# -- reading files ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,content,error,match",
    [
        ("missing.jsonl", None, FileNotFoundError, "does not exist"),
        ("empty.jsonl", "", ValueError, "is empty"),
        ("data.csv", "a,b\n1,2\n", ValueError, "unsupported extension '.csv'"),
        ("bad.jsonl", '{"prompt": "unterminated\n', ValueError, "could not parse"),
    ],
)
def test_read_records_errors(tmp_path, name, content, error, match):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(error, match=match):
        read_records(str(path))


def test_read_records_rejects_mixed_formats(tmp_path, write_jsonl):
    (tmp_path / "b.txt").write_text("some text\n")
    with pytest.raises(ValueError, match="mix formats"):
        read_records([write_jsonl([{"text": "a"}]), str(tmp_path / "b.txt")])


def test_read_builtin_prompts():
    ds = read_records("builtin:prompts")
    assert len(ds) == 600 and record_kind(ds.column_names) == "prompt"


@pytest.mark.parametrize("sample_by,count", [("line", 5), ("paragraph", 2), ("document", 1)])  # the blank line is a line
def test_text_files_by_line_paragraph_or_document(tmp_path, sample_by, count):
    (tmp_path / "doc.txt").write_text("one\ntwo\n\nthree\nfour\n")
    assert len(read_records(str(tmp_path / "doc.txt"), sample_by=sample_by)) == count


def test_unknown_builtin_and_text_unit_are_named():
    with pytest.raises(ValueError, match="'builtin:poems'.*builtin:chat"):
        read_records("builtin:poems")
    with pytest.raises(ValueError, match="sample_by"):
        read_records("builtin:corpus", sample_by="page")


@pytest.mark.parametrize(
    "columns,kind",
    [(["messages", "text"], "messages"), (["prompt", "response"], "prompt_response"), (["prompt", "id"], "prompt"), (["text"], "text")],
)
def test_record_kind(columns, kind):
    assert record_kind(columns) == kind


def test_record_kind_without_usable_columns(write_jsonl):
    with pytest.raises(ValueError, match="records need.*'question'"):
        record_kind(read_records(write_jsonl([{"question": "q", "answer": "a"}])).column_names)


# -- tokenizing ---------------------------------------------------------------------------------------------
def test_messages_loss_positions_are_the_assistant_turns(tokenizer):
    """Expected positions come from the rendered text: tokens inside each assistant turn's content and end tokens."""
    example = tokenize_record(tokenizer, CHAT, "messages")
    text = tokenizer.apply_chat_template(CHAT["messages"], tokenize=False)
    encoded = tokenizer(text, return_offsets_mapping=True)
    assert example["input_ids"] == encoded["input_ids"]
    spans = [m.span(1) for m in re.finditer(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>\n)", text, re.S)]
    assert len(spans) == 2
    expected = {i for i, (a, b) in enumerate(encoded["offset_mapping"]) if any(s <= a and b <= e for s, e in spans)}
    assert {i for i, m in enumerate(example["loss_mask"]) if m} == expected
    masked = tokenizer.decode([t for t, m in zip(example["input_ids"], example["loss_mask"]) if m])
    assert masked == "Hello! How can I help?<|im_end|>\nBlue, like the sky.<|im_end|>\n"


def test_prompt_response_record(tokenizer):
    record = {"prompt": "What is 2+2?", "response": "4."}
    example = tokenize_record(tokenizer, record, "prompt_response")
    prompt = prompt_ids(tokenizer, record, "prompt_response")
    n = len(prompt)
    assert example["input_ids"][:n] == prompt
    assert example["loss_mask"] == [0] * n + [1] * (len(example["input_ids"]) - n)
    assert tokenizer.decode(example["input_ids"][n:]) == "4.<|im_end|>\n"


def test_text_record_learns_all_but_the_first_token(tokenizer):
    example = tokenize_record(tokenizer, {"text": "The quick brown fox."}, "text")
    assert example["input_ids"] == tokenizer("The quick brown fox.")["input_ids"] + [tokenizer.eos_token_id]
    assert example["loss_mask"] == [0] + [1] * (len(example["input_ids"]) - 1)


def test_chat_record_errors(tokenizer):
    with pytest.raises(ValueError, match="no assistant turn"):
        tokenize_record(tokenizer, {"messages": [{"role": "user", "content": "hi"}]}, "messages")
    with pytest.raises(ValueError, match="no turn before"):
        prompt_ids(tokenizer, {"messages": [{"role": "assistant", "content": "hi"}]}, "messages")


@pytest.mark.parametrize(
    "overlong,expected",
    [("truncate", {"input_ids": [1, 2, 3], "loss_mask": [0, 1, 1]}), ("drop", None)],
)
def test_fit_length(overlong, expected):
    example = {"input_ids": [1, 2, 3, 4, 5], "loss_mask": [0, 1, 1, 1, 1]}
    assert fit_length(example, 5, overlong) is example
    assert fit_length(example, 3, overlong) == expected


def test_fit_length_error_names_max_length():
    with pytest.raises(ValueError, match="5 tokens > max_length=3"):
        fit_length({"input_ids": [1, 2, 3, 4, 5], "loss_mask": [0, 1, 1, 1, 1]}, 3, "error")


# -- batches ------------------------------------------------------------------------------------------------
def rows_with_teacher():
    """Rows whose top-1 'teacher' at each loss position is the next token: collated, it must line up with the labels."""
    rows = [
        {"input_ids": [5, 6, 7, 8], "loss_mask": [0, 0, 1, 1]},
        {"input_ids": [9, 10, 11, 12, 13, 14], "loss_mask": [0, 1, 1, 0, 1, 1]},
        {"input_ids": [15, 16], "loss_mask": [0, 1]},
    ]
    for r in rows:
        labels = [t for t, m in zip(r["input_ids"][1:], r["loss_mask"][1:]) if m]
        r["teacher_indices"] = [[t, 0] for t in labels]
        r["teacher_logprobs"] = [[-float(t), -99.0] for t in labels]
    return rows


def test_collate_pads_and_marks_prompts():
    batch = collate_tokens(rows_with_teacher(), pad_id=2)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 2, 2], [9, 10, 11, 12, 13, 14], [15, 16, 2, 2, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6, [1, 1, 0, 0, 0, 0]]
    assert batch["loss_mask"].tolist() == [[0, 0, 1, 1, 0, 0], [0, 1, 1, 0, 1, 1], [0, 1, 0, 0, 0, 0]]
    # prompts (tokens before the first loss token) are left-padded for generation
    assert batch["prompt_ids"].tolist() == [[5, 6], [2, 9], [2, 15]]
    assert batch["prompt_mask"].tolist() == [[1, 1], [0, 1], [0, 1]]


def test_collate_teacher_rows_follow_the_loss_positions():
    batch = collate_tokens(rows_with_teacher(), pad_id=2)
    labels = batch["input_ids"][:, 1:][batch["loss_mask"][:, 1:]]
    assert batch["teacher_indices"].shape == (len(labels), 2)
    assert batch["teacher_indices"][:, 0].tolist() == labels.tolist()
    assert batch["teacher_logprobs"][:, 0].tolist() == (-labels.float()).tolist()


def batches(sampler, epoch=0):
    sampler.set_epoch(epoch)
    order = list(sampler)
    return [order[i : i + sampler.batch_size] for i in range(0, len(order), sampler.batch_size)]


@pytest.mark.parametrize("shuffle", [True, False])
def test_sampler_global_batches_do_not_depend_on_world_size(shuffle):
    single = batches(ResumableSampler(21, 4, seed=3, shuffle=shuffle), epoch=1)
    ranks = [batches(ResumableSampler(21, 2, num_replicas=2, rank=r, seed=3, shuffle=shuffle), epoch=1) for r in (0, 1)]
    assert len(single) == 5  # 21 // 4: the ragged tail is dropped
    assert single == [a + b for a, b in zip(*ranks)]
    assert len({i for b in single for i in b}) == 20


def test_sampler_epochs_reshuffle():
    sampler = ResumableSampler(40, 4, seed=0)
    assert batches(sampler, 0) != batches(sampler, 1)
    assert batches(sampler, 0) == batches(ResumableSampler(40, 4, seed=0), 0)


@pytest.mark.parametrize("epoch", [1, 3])
def test_sampler_resume_continues_a_data_epoch_under_any_epoch_number(epoch):
    full = [batches(ResumableSampler(40, 4, seed=0), e) for e in (2, 3)]
    sampler = ResumableSampler(40, 4, seed=0)
    sampler.resume(2, 6)
    assert batches(sampler, epoch) == full[0][6:]
    assert batches(sampler, epoch + 1) == full[1]


@pytest.mark.parametrize("consumed,passes", [(0, [3]), (10, [2, 3])])  # (10, ...): an empty pass finishes epoch 2
def test_sampler_resume_after_a_finished_epoch(consumed, passes):
    """A trainer that starts a fresh epoch gets the next one; one that counts the finished epoch gets it empty first."""
    sampler = ResumableSampler(40, 4, seed=0)
    sampler.counter = lambda: consumed
    sampler.resume(2, 10)
    got = [batches(sampler, 5 + i) for i in range(len(passes))]
    assert got == [[] if e == 2 else batches(ResumableSampler(40, 4, seed=0), e) for e in passes]


def test_sampler_position_counts_consumed_batches():
    consumed = [0]
    sampler = ResumableSampler(40, 4, seed=0)
    sampler.counter = lambda: consumed[0]
    sampler.resume(2, 6)
    assert sampler.position() == (2, 6)
    sampler.set_epoch(0)
    iter(sampler).__next__()  # the pass begins (prefetching does not count as consumed)
    consumed[0] = 3
    assert sampler.position() == (2, 9)


def test_shard_sampler_gives_every_record_to_one_rank():
    shards = [list(ShardSampler(7, num_replicas=3, rank=r)) for r in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]] and [len(ShardSampler(7, num_replicas=3, rank=r)) for r in range(3)] == [3, 2, 2]


def test_sampler_needs_one_global_batch():
    with pytest.raises(ValueError, match="cannot fill one global batch of 8"):
        ResumableSampler(7, 4, num_replicas=2)


# -- the datamodule -----------------------------------------------------------------------------------------
def test_fixed_datamodule_splits_and_batches(qa_datamodule):
    dm = qa_datamodule(n=24, val_size=4, batch_size=3)
    dm.setup("fit")
    assert (len(dm.splits["train"]), len(dm.splits["val"])) == (20, 4)
    assert dm.stats["train_samples"] == 20 and dm.stats["val_samples"] == 4
    train_prompts = {tuple(x) for x in dm.splits["train"]["input_ids"]}
    assert not train_prompts & {tuple(x) for x in dm.splits["val"]["input_ids"]}
    loader = dm.train_dataloader()
    assert len(loader) == 6
    batch = next(iter(loader))
    assert batch["input_ids"].shape[0] == 3 and batch["loss_mask"].any(1).all()


def test_fixed_datamodule_reuses_its_cache(qa_datamodule, monkeypatch):
    first = qa_datamodule()
    first.setup("fit")
    monkeypatch.setattr(data, "tokenize_record", lambda *a: pytest.fail("re-tokenized despite the cache"))
    second = qa_datamodule()
    second.setup("fit")
    for name in ("train", "val"):
        assert second.splits[name]["input_ids"] == first.splits[name]["input_ids"]


def test_val_files(qa_datamodule, write_jsonl):
    dm = qa_datamodule(n=6, val_files=write_jsonl(qa_records(3), "val.jsonl"))
    dm.setup("fit")
    assert (len(dm.splits["train"]), len(dm.splits["val"])) == (6, 3)


def test_target_source_generates_and_caches(tmp_path, write_jsonl, tokenizer, monkeypatch):
    prompts = write_jsonl([{"prompt": f"Question {i}?"} for i in range(6)], "prompts.jsonl")
    calls = []
    generate = data.generate_responses
    monkeypatch.setattr(data, "generate_responses", lambda *a, **k: calls.append(k["desc"]) or generate(*a, **k))

    def setup(target) -> DistillDataModule:
        dm = DistillDataModule(
            train_files=prompts, source="target", val_size=2, max_new_tokens=3, batch_size=2,
            cache_dir=str(tmp_path / "cache"), tokenizer=tokenizer, target=target,
        )
        dm.setup("fit")
        return dm

    dm = setup(make_tiny_target())
    assert sorted(calls) == ["target generates train", "target generates val"]
    for record_ids, mask in zip(dm.splits["train"]["input_ids"], dm.splits["train"]["loss_mask"]):
        n = mask.index(1)
        assert tokenizer.decode(record_ids[:n]).endswith("<|im_start|>assistant\n")
        assert 1 <= len(record_ids) - n <= 3 and all(mask[n:])

    assert setup(make_tiny_target()).splits["train"]["input_ids"] == dm.splits["train"]["input_ids"]
    assert len(calls) == 2  # the same target weights: cached
    setup(make_tiny_target(seed=1))
    assert len(calls) == 4  # other weights: generated anew


def test_teacher_topk_columns(qa_datamodule, tiny_target):
    dm = qa_datamodule(n=8, val_size=2, teacher_topk=3, target=tiny_target)
    dm.setup("fit")
    train = dm.splits["train"]
    assert "teacher_indices" not in dm.splits["val"].column_names
    assert dm.stats["teacher_bytes_per_token"] == 24
    for ids, mask, idx, lp in zip(train["input_ids"], train["loss_mask"], train["teacher_indices"], train["teacher_logprobs"]):
        assert len(idx) == len(lp) == sum(mask[1:])
        assert all(len(row) == 3 for row in idx + lp)
    ids, mask = torch.tensor(train["input_ids"][0]), torch.tensor(train["loss_mask"][0], dtype=torch.bool)
    with torch.no_grad():
        logp = torch.log_softmax(tiny_target(ids[None]).logits[0, :-1][mask[1:]], -1)
    top = logp.topk(3, -1)
    assert torch.tensor(train["teacher_indices"][0]).tolist() == top.indices.tolist()
    torch.testing.assert_close(torch.tensor(train["teacher_logprobs"][0]), top.values, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("room", [None, 3])
def test_generated_split_records_its_teacher(tmp_path, write_jsonl, tokenizer, tiny_target, monkeypatch, room):
    """Generated data gets its offline teacher while the target samples it (no second pass over the data): the
    same top-k a teacher-forced pass gives, cut with the response when max_length truncates it."""
    records = [{"prompt": f"Question {i}?"} for i in range(6)]
    monkeypatch.setattr(data, "teacher_topk", lambda *a, **k: pytest.fail("a second teacher pass ran"))
    longest = max(len(data.prompt_ids(tokenizer, r, "prompt")) for r in records)
    dm = DistillDataModule(
        train_files=write_jsonl(records), source="target", val_size=2, max_new_tokens=6, gen_temperature=1.0, gen_batch_size=3,
        teacher_topk=3, batch_size=2, cache_dir=str(tmp_path / "cache"), tokenizer=tokenizer, target=tiny_target,
        **(dict(max_length=longest + room, overlong="truncate") if room else {}),
    )
    dm.setup("fit")
    train = dm.splits["train"]
    assert "teacher_indices" not in dm.splits["val"].column_names
    for ids, mask, idx, lp in zip(train["input_ids"], train["loss_mask"], train["teacher_indices"], train["teacher_logprobs"]):
        ids, mask = torch.tensor(ids), torch.tensor(mask, dtype=torch.bool)
        assert len(idx) == len(lp) == int(mask[1:].sum())
        with torch.no_grad():
            top = torch.log_softmax(tiny_target(ids[None]).logits[0, :-1][mask[1:]], -1).topk(3, -1)
        assert torch.tensor(idx).tolist() == top.indices.tolist()
        torch.testing.assert_close(torch.tensor(lp), top.values, rtol=1e-4, atol=1e-4)
    if room:
        assert max(len(ids) for ids in train["input_ids"]) == longest + room


def test_samples_per_prompt_in_gen_dtype(tmp_path, write_jsonl, tokenizer, tiny_target):
    """Each training prompt gets its own samples (validation one), drawn by a bf16 copy of the target whose
    top-k is the recorded teacher; the target itself stays as it was."""
    records = [{"prompt": f"Question {i}?"} for i in range(6)]
    dm = DistillDataModule(
        train_files=write_jsonl(records), source="target", val_size=2, max_new_tokens=4, gen_temperature=1.0,
        samples_per_prompt=3, gen_dtype="bfloat16", teacher_topk=3, cache_dir=str(tmp_path), tokenizer=tokenizer, target=tiny_target,
    )
    dm.setup("fit")
    train = dm.splits["train"]
    assert (len(train), len(dm.splits["val"]), dm.stats["train_dropped"]) == (12, 2, 0)
    assert next(tiny_target.parameters()).dtype == torch.float32
    prompts = {}
    for ids, mask in zip(train["input_ids"], train["loss_mask"]):
        n = mask.index(1)
        prompts.setdefault(tuple(ids[:n]), set()).add(tuple(ids[n:]))
    assert len(prompts) == 4 and sum(len(responses) for responses in prompts.values()) > 4  # distinct samples
    sampler = copy.deepcopy(tiny_target).to(torch.bfloat16)
    ids, mask = torch.tensor(train["input_ids"][0]), torch.tensor(train["loss_mask"][0], dtype=torch.bool)
    with torch.no_grad():
        top = torch.log_softmax(sampler(ids[None]).logits[0, :-1][mask[1:]].float(), -1).topk(3, -1)
    torch.testing.assert_close(torch.tensor(train["teacher_logprobs"][0]), top.values, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("source", ["fixed", "target"])
def test_overlong_policies(tmp_path, write_jsonl, tokenizer, tiny_target, source):
    records = [{"prompt": f"Short {i}?", "response": "Yes."} for i in range(5)]
    records += [{"prompt": "long " * 80, "response": "Yes."} for _ in range(2)]

    def make(overlong):
        return DistillDataModule(
            train_files=write_jsonl(records), val_files=write_jsonl(records[:1], "val.jsonl"), source=source,
            max_length=48, max_new_tokens=2, overlong=overlong, cache_dir=str(tmp_path / overlong),
            tokenizer=tokenizer, target=tiny_target,
        )

    with pytest.raises(ValueError, match="max_length=48"):
        make("error").setup("fit")
    dropping = make("drop")
    dropping.setup("fit")
    assert dropping.stats["train_dropped"] == 2 and dropping.stats["train_samples"] == 5


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(source="model"), "source"),
        (dict(overlong="wrap"), "overlong"),
        (dict(batch_size=0), "batch_size"),
        (dict(max_length=0), "max_length"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(gen_batch_size=0), "gen_batch_size"),
        (dict(samples_per_prompt=0), "samples_per_prompt"),
        (dict(source="fixed", samples_per_prompt=2), "samples_per_prompt=2 needs source='target'"),
        (dict(gen_dtype="int8"), "gen_dtype"),
        (dict(teacher_topk=0), "teacher_topk"),
        (dict(val_size=0), "val_size"),
    ],
)
def test_bad_datamodule_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DistillDataModule(**kwargs)


@pytest.mark.parametrize(
    "records,source,match",
    [([{"prompt": "p"}] * 3, "fixed", "source='fixed' needs responses"), ([{"text": "t"}] * 3, "target", "needs prompts")],
)
def test_records_that_do_not_fit_the_source(tmp_path, write_jsonl, tokenizer, tiny_target, records, source, match):
    dm = DistillDataModule(train_files=write_jsonl(records), val_size=1, source=source, cache_dir=str(tmp_path), tokenizer=tokenizer, target=tiny_target)
    with pytest.raises(ValueError, match=match):
        dm.setup("fit")


def test_missing_tokenizer_is_explained(qa_datamodule):
    with pytest.raises(ValueError, match="needs a tokenizer"):
        qa_datamodule(tokenizer=None).setup("fit")
