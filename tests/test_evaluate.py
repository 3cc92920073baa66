"""`lightning-spec eval`: the report directory (report.md, metrics.json, plots) and bad input."""
import json
import sys

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_spec import cli
from lightning_spec.evaluate import evaluate, parse_drafts
from lightning_spec.models import build_draft, load_causal_lm


@pytest.fixture
def prompts(write_jsonl):
    return write_jsonl([{"prompt": "Name a color."}, {"prompt": "What is a river?"}], "prompts.jsonl")


def test_cli_writes_the_report(tmp_path, tiny_dir, prompts, monkeypatch, capsys):
    target, _ = load_causal_lm(tiny_dir)
    build_draft(target, num_layers=2).save_pretrained(tmp_path / "two_layers")
    out = tmp_path / "report"
    argv = ["lightning-spec", "eval", "--target", str(tiny_dir), "--drafts", "cut=cut:0", f"dir={tmp_path / 'two_layers'}",
            "--prompts", prompts, "--gammas", "1", "3", "--tree", "2", "1", "--max-new-tokens", "6", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    cli.main()
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["drafts"]) == {"cut", "dir"}
    runs = metrics["drafts"]["dir"]["runs"]
    assert set(runs) == {"gamma=1", "gamma=3", "tree [2, 1]"}
    assert runs["gamma=3"]["depth"] == 3 and len(runs["gamma=3"]["accept_at"]) == 3 and runs["tree [2, 1]"]["depth"] == 2
    assert runs["gamma=1"]["predicted_speedup"] > 0 and runs["tree [2, 1]"]["predicted_speedup"] is None
    assert runs["gamma=1"]["verify_cost"] > 0
    assert 0 <= metrics["drafts"]["cut"]["fidelity"]["alpha"] <= 1 and metrics["drafts"]["cut"]["best_gamma"] >= 1
    report = (out / "report.md").read_text()
    assert "| dir | gamma=3 |" in report and "Fidelity" in report
    assert metrics["linear"] == "SmallBatchLinear" and "SmallBatchLinear." in report
    for png in ("acceptance_per_position.png", "gamma_sweep.png", "measured_vs_predicted.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert "report written to" in capsys.readouterr().out


def test_stock_linear_keeps_nn_linear(tmp_path, tiny_dir, prompts):
    metrics = evaluate(str(tiny_dir), {"cut": "cut:0"}, prompts, gammas=[1], tree=None, max_new_tokens=4,
                       out=str(tmp_path / "r"), stock_linear=True)
    assert metrics["linear"] == "nn.Linear" and "nn.Linear." in (tmp_path / "r" / "report.md").read_text()


@pytest.mark.parametrize("spec,match", [(["nameonly"], "name=source"), (["a=x", "a=y"], "twice"), ([], "at least one")])
def test_bad_draft_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_drafts(spec)


def test_bad_input_is_named(tmp_path, tiny_dir, prompts, write_jsonl):
    small = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    small.save_pretrained(tmp_path / "small")
    with pytest.raises(ValueError, match="draft 'small': vocabulary mismatch"):
        evaluate(str(tiny_dir), {"small": str(tmp_path / "small")}, prompts, gammas=[1], out=str(tmp_path / "r"))
    with pytest.raises(ValueError, match="gammas"):
        evaluate(str(tiny_dir), {"cut": "cut:0"}, prompts, gammas=[0], out=str(tmp_path / "r"))
    with pytest.raises(ValueError, match="cut:"):
        evaluate(str(tiny_dir), {"cut": "cut:a,b"}, prompts, gammas=[1], out=str(tmp_path / "r"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        evaluate(str(tiny_dir), {"cut": "cut:0"}, str(empty), gammas=[1], out=str(tmp_path / "r"))
