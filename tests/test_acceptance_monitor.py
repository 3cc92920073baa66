"""AcceptanceRateMonitor: logs real speculative-decoding figures, drives ModelCheckpoint, resumes its progress,
runs under DDP without hanging, refuses bad arguments."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_spec.callbacks import AcceptanceRateMonitor
from lightning_spec.metrics import functional as F

WORKER = Path(__file__).with_name("ddp_worker.py")
KEYS = {"spec/alpha", "spec/tau", "spec/cost_ratio", "spec/expected_speedup", "spec/best_gamma", "spec/accept@1", "spec/accept@2", "spec/accept@3"}


class Recorder(Callback):
    def __init__(self):
        self.taus = []

    def on_validation_end(self, trainer, pl_module):
        self.taus.append(float(trainer.callback_metrics["spec/tau"]))


def test_logs_the_figures_and_keeps_the_best_draft(tmp_path, make_module, make_trainer, qa_datamodule):
    monitor = AcceptanceRateMonitor(prompts=["Name a fruit.", "What is two plus two?", "Say hi."], gamma=3, max_new_tokens=6)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="spec/tau", mode="max", save_top_k=1)
    recorder = Recorder()
    trainer = make_trainer(
        max_steps=6, val_check_interval=2, limit_val_batches=1, enable_checkpointing=True, callbacks=[monitor, checkpoint, recorder]
    )
    trainer.fit(make_module(), datamodule=qa_datamodule())
    assert KEYS <= set(trainer.callback_metrics)
    figures = monitor.last
    assert 1.0 <= figures["spec/tau"] <= 4.0 and 0.0 <= figures["spec/alpha"] <= 1.0
    assert figures["spec/expected_speedup"] == pytest.approx(F.expected_speedup(figures["spec/alpha"], 3, figures["spec/cost_ratio"]))
    assert len(recorder.taus) == 3 and monitor.runs == 3
    assert float(checkpoint.best_model_score) == pytest.approx(max(recorder.taus))
    assert Path(checkpoint.best_model_path).is_file()


def test_every_n_steps_and_state(make_module, make_trainer, qa_datamodule, tokenizer):
    prompts = [tokenizer("Once upon a time")["input_ids"], tokenizer("The capital of")["input_ids"]]
    monitor = AcceptanceRateMonitor(prompts=prompts, gamma=2, every_n_steps=2, max_new_tokens=4, temperature=0.8, tree=[-1, 0, 0, 1])
    trainer = make_trainer(max_steps=4, callbacks=[monitor])
    trainer.fit(make_module(), datamodule=qa_datamodule())
    assert monitor.runs == 2 and "spec/accept@2" in trainer.callback_metrics  # the tree's depth is 2
    state = monitor.state_dict()
    again = AcceptanceRateMonitor(prompts=prompts, gamma=2, every_n_steps=2, tree=[-1, 0, 0, 1])
    again.load_state_dict(json.loads(json.dumps(state)))
    assert again.runs == 2 and json.dumps(again.last) == json.dumps(monitor.last)  # nan where a position was never reached
    assert again.state_key == monitor.state_key


def test_builtin_prompt_file(make_module):
    monitor = AcceptanceRateMonitor(prompts="builtin:prompts", num_prompts=2, gamma=2, max_new_tokens=3)
    figures = monitor.measure(make_module())
    assert set(figures) == {"spec/alpha", "spec/tau", "spec/cost_ratio", "spec/expected_speedup", "spec/best_gamma", "spec/accept@1", "spec/accept@2"}


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(gamma=0), "gamma"), (dict(every_n_steps=0), "every_n_steps"), (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=-1.0), "temperature"), (dict(prompts=[]), "empty"), (dict(tree=[0, 1]), "tree"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        AcceptanceRateMonitor(**kwargs)


def test_module_without_a_draft_is_refused():
    with pytest.raises(MisconfigurationException, match="target` and `draft"):
        AcceptanceRateMonitor(prompts=[[1, 2, 3]]).measure(LightningModule())


def test_ddp_logs_the_same_figures_on_every_rank(tmp_path, tiny_dir, write_jsonl):
    from conftest import qa_records

    args = dict(target=str(tiny_dir), data=write_jsonl(qa_records(14)), cache=str(tmp_path / "cache"))
    command = [sys.executable, str(WORKER), "--devices=2", "--batch_size=2", f"--out={tmp_path / 'ddp'}", "--monitor=1", "--steps=4"]
    command += [f"--{k}={v}" for k, v in args.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent)}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["spec"] and ranks[0]["spec"] == ranks[1]["spec"]
    assert ranks[0]["best"] == ranks[1]["best"] is not None
