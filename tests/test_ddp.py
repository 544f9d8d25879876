"""Scale-out: DDP with 2 CPU processes (gloo) end to end through the CLI, against one process.

`batch_size` is per process, so DDP with 2 x 1 example sees, step by step, the same examples as one process
with batch 2 (the sampler interleaves the ranks' shards: tasks/sampler.py). The results are equal within a
tolerance, not bit-identical: one process averages the loss over all target tokens of the batch, DDP averages
the two ranks' per-example means (equal only when both examples have as many target tokens), and Adam's
first, normalised steps turn such small gradient differences into parameter differences of up to about
lr per step. Dropout is off so both runs draw no random numbers during training.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.test_resume import run_cli

STEPS, LR = 4, 1e-3
COMMON = [
    "experiment=smoke",
    "logger=none",
    f"trainer.max_steps={STEPS}",
    f"optim.lr={LR}",
    "method.dropout=0",
    "checkpoint.every_n_steps=2",
    "checkpoint.keep_on_success=true",
]


def test_ddp_two_cpu_processes_match_one_process(tmp_path: Path) -> None:
    ddp = run_cli(
        [*COMMON, "trainer=ddp", "trainer.devices=2", "batch_size=1"], tmp_path / "ddp", tmp_path / "r"
    )
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    one = run_cli([*COMMON, "batch_size=2"], tmp_path / "one", tmp_path / "r1")
    assert one.returncode == 0, one.stderr[-4000:]

    # rank 0 alone writes: one record in the store, one adapter, one set of checkpoints
    stored = list((tmp_path / "r" / "smoke").glob("*.json"))
    assert len(stored) == 1
    r_ddp = json.loads((tmp_path / "ddp" / "record.json").read_text())
    r_one = json.loads((tmp_path / "one" / "record.json").read_text())
    assert json.loads(stored[0].read_text()) == r_ddp
    assert r_ddp["status"] == "ok" and r_ddp["world_size"] == 2 and r_one["world_size"] == 1
    assert r_ddp["steps"] == r_one["steps"] == STEPS
    assert r_ddp["train_tokens"] < r_one["train_tokens"]  # rank 0 counts its own half

    # the same examples step by step: the logged loss (mean over ranks) is close to one process's
    for (s1, l1), (s2, l2) in zip(
        r_one["history"]["train_loss"], r_ddp["history"]["train_loss"], strict=True
    ):
        assert s1 == s2 and abs(l1 - l2) < 0.05 * l1, (l1, l2)
    # final metrics within tolerance (see the module docstring for why not exactly)
    for key in ("test/loss", "val/loss"):
        assert abs(r_ddp["metrics"][key] - r_one["metrics"][key]) < 1e-3 * r_one["metrics"][key], key

    # the adapter: saved once, trained (not the zero-init B), within about lr x steps of one process's
    a_ddp = load_file(str(tmp_path / "ddp" / "adapter" / "adapter.safetensors"))
    a_one = load_file(str(tmp_path / "one" / "adapter" / "adapter.safetensors"))
    assert a_ddp.keys() == a_one.keys()
    assert any(k.endswith("lora_B") and t.abs().max() > 0 for k, t in a_ddp.items())
    worst = max(float((a_ddp[k] - a_one[k]).abs().max()) for k in a_ddp)
    assert worst <= 2 * STEPS * LR, worst
    # the checkpoint written by rank 0 holds the same adapter as the adapter file
    last = torch.load(tmp_path / "ddp" / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(torch.equal(last["state_dict"][f"model.{k}"], t) for k, t in a_ddp.items())
