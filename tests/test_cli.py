import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM

from conftest import qa_records
import lightning_spec
from lightning_spec.cli import build_cli

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))
DRAFT_EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "smollm2_draft.yaml"


@pytest.mark.parametrize("config", EXAMPLES, ids=lambda p: p.name)
def test_example_instantiates(tmp_path, monkeypatch, config):
    monkeypatch.chdir(tmp_path)  # the examples write under artifacts/
    cli = build_cli(["--config", str(config)], run=False)  # no subcommand when run=False
    classes = yaml.safe_load(config.read_text())
    for got, key in ((cli.model, "model"), (cli.datamodule, "data")):
        assert type(got) is getattr(lightning_spec, classes[key]["class_path"].rpartition(".")[2])
    assert cli.model.tokenizer is not None


def test_print_config(tmp_path):
    command = [str(Path(sys.executable).with_name("lightning-spec")), "fit", "--config", str(DRAFT_EXAMPLE), "--print_config"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "DraftDistillationModule" in done.stdout
    assert yaml.safe_load(done.stdout)["model"]["init_args"]["loss"] == "fkl"


def test_unknown_key_is_named(tmp_path, capsys):
    config = yaml.safe_load(DRAFT_EXAMPLE.read_text())
    config["model"]["init_args"]["lossx"] = "fkl"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", "--config", str(path)])
    assert exit_info.value.code != 0
    assert "lossx" in capsys.readouterr().err


def test_fit_a_tiny_draft_and_export(tmp_path, monkeypatch, tiny_dir, write_jsonl):
    monkeypatch.chdir(tmp_path)
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "max_steps": 2, "logger": False, "enable_checkpointing": False,
            "enable_progress_bar": False, "num_sanity_val_steps": 0, "limit_val_batches": 0,
            "callbacks": [
                {"class_path": "lightning_spec.ExportHF", "init_args": {"dirpath": str(tmp_path / "export")}},
                {"class_path": "lightning_spec.AcceptanceRateMonitor",
                 "init_args": {"prompts": [[5, 6, 7]], "gamma": 2, "every_n_steps": 2, "max_new_tokens": 3}},
            ],
        },
        "model": {
            "class_path": "lightning_spec.DraftDistillationModule",
            # no optimizer: the default function must survive jsonargparse
            "init_args": {"target": str(tiny_dir), "draft": {"num_layers": 1}, "loss": "jsd"},
        },
        "data": {
            "class_path": "lightning_spec.DistillDataModule",
            "init_args": {
                "train_files": write_jsonl(qa_records(8)), "source": "fixed", "val_size": 2, "batch_size": 2,
                "cache_dir": str(tmp_path / "cache"),
            },
        },
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = build_cli(["fit", "--config", str(path)])
    assert cli.trainer.global_step == 2
    assert "spec/tau" in cli.trainer.callback_metrics  # the monitor ran from YAML
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "export").config.num_hidden_layers == 1
    # the console entry point exits 0 after a successful fit (the returned CLI object must not become the status)
    done = subprocess.run([str(Path(sys.executable).with_name("lightning-spec")), "fit", "--config", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
