import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import qa_records
from ddp_worker import train

WORKER = Path(__file__).with_name("ddp_worker.py")


def read(path: Path):
    return json.loads(path.read_text())


def test_ddp_equals_one_process_on_the_global_batch(tmp_path, tiny_dir, write_jsonl):
    """2 ranks x batch 2 == 1 process x batch 4, although the ranks' token counts differ (global normalization)."""
    args = dict(target=str(tiny_dir), data=write_jsonl(qa_records(14)), cache=str(tmp_path / "cache"))
    train(**args, out=str(tmp_path / "single"), devices=1, batch_size=4)  # also builds the data cache the ranks share
    command = [sys.executable, str(WORKER), "--devices=2", "--batch_size=2", f"--out={tmp_path / 'ddp'}"]
    command += [f"--{k}={v}" for k, v in args.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent)}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]

    single = read(tmp_path / "single" / "rank0.json")
    ranks = [read(tmp_path / "ddp" / f"rank{r}.json") for r in (0, 1)]
    assert ranks[0]["tokens"] != ranks[1]["tokens"]
    assert [a + b for a, b in zip(ranks[0]["tokens"], ranks[1]["tokens"])] == single["tokens"]
    for rank in ranks:
        torch.testing.assert_close(torch.tensor(rank["losses"]), torch.tensor(single["losses"]), rtol=1e-5, atol=0)

    one, two = (torch.load(tmp_path / run / "draft.pt") for run in ("single", "ddp"))
    torch.testing.assert_close(two, one, rtol=1e-5, atol=1e-6)
    start = load_file(tiny_dir / "model.safetensors")["model.layers.0.mlp.up_proj.weight"]
    assert (one["model.layers.0.mlp.up_proj.weight"] - start).abs().max() > 1e-3  # the comparison is not vacuous
