import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lightning_spec.quant.numerics import weight_qparams

from conftest import qa_records
from ddp_worker import train

WORKER = Path(__file__).with_name("ddp_worker.py")


def read(path: Path):
    return json.loads(path.read_text())


@pytest.mark.parametrize("qat,fit_head", [(0, 0), (1, 0), (0, 1)], ids=["fp", "qat_learned_scales", "fitted_head"])
def test_ddp_equals_one_process_on_the_global_batch(tmp_path, tiny_dir, write_jsonl, qat, fit_head):
    """2 ranks x batch 2 == 1 process x batch 4, although the ranks' token counts differ (global normalization); with
    QAT, the learned scales too (their gradients are averaged outside DDP's buckets); with a fitted (then trained)
    head, the ranks fit the same one."""
    args = dict(target=str(tiny_dir), data=write_jsonl(qa_records(14)), cache=str(tmp_path / "cache"), qat=qat, fit_head=fit_head)
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
    # Fake quantization rounds: float noise between the runs' weights flips a few codes, and SGD at lr 2 amplifies it.
    rtol, atol = (3e-3, 1e-3) if qat else (1e-5, 1e-6)
    # the fitted head leaves a tiny target's 2-layer cut a loss near 1e-5, where summation order shows in relative terms
    loss_atol = 1e-7 if fit_head else 0
    for rank in ranks:
        torch.testing.assert_close(torch.tensor(rank["losses"]), torch.tensor(single["losses"]), rtol=rtol, atol=loss_atol)

    one, two, two_rank1 = (torch.load(tmp_path / run / f"draft{r}.pt") for run, r in (("single", 0), ("ddp", 0), ("ddp", 1)))
    torch.testing.assert_close(two, one, rtol=rtol, atol=atol)
    assert all(torch.equal(two[k], two_rank1[k]) for k in two)  # the ranks hold one model, scales included
    start = load_file(tiny_dir / "model.safetensors")["model.layers.0.mlp.up_proj.weight"]
    assert (one["model.layers.0.mlp.up_proj.weight"] - start).abs().max() > 1e-3  # the comparison is not vacuous
    if qat:
        scale = one["model.layers.0.mlp.up_proj.weight_scale"]
        observed, _ = weight_qparams(two["model.layers.0.mlp.up_proj.weight"], "int4", 32)
        assert not torch.allclose(scale, observed)  # learned: no longer the statistics of the weights
