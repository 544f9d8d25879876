"""Scale-out: DDP with 2 CPU processes (gloo) end to end, against one process; FSDP's limits.

`batch_size` is per process, so DDP with 2 x 1 example sees, step by step, the same examples as one process
with batch 2 (the sampler interleaves the ranks' shards: tasks/sampler.py). The results are equal within a
tolerance, not bit-identical: one process averages the loss over all target tokens of the batch, DDP averages
the two ranks' per-example means (equal only when both examples have as many target tokens), and Adam's
first, normalised steps turn such small gradient differences into parameter differences of up to about
lr per step. Dropout is off so both runs draw no random numbers during training.

Methods whose state is not a plain trainable parameter (VeRA's shared projection buffers, Delta-LoRA's
in-place W0 updates, QLoRA's 4-bit base) run through `tests/ddp_worker.py`, which makes every rank dump its
model's whole state, on the classification task (verbaliser): every example's loss is on one label-word
token, so the mean of the ranks' means is the single-process mean and DDP matches one process up to float
rounding. Checked: every tensor identical on both ranks, and equal (frozen or regenerated state) or within
1e-4 (trained state) of the single-process run.

FSDP: Lightning's FSDPStrategy (2.6) refuses any accelerator but CUDA, so `trainer=fsdp` on a CPU-only
machine stops before training with one line (conf/trainer/fsdp.yaml says where it runs).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import run_module
from tests.test_resume import ROOT, _env, run_cli

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


# ----- methods with state beyond plain trainable parameters -----------------------------------------------
CLASSIFY = [
    "model=tiny_llama",
    "logger=none",
    "evaluate_before=false",
    "task=classification",
    "task.max_tokens=32",
    "task.probe=null",
    "task.split.val=4",
    "task.split.test=8",
    "task.split.max_train=8",
    "task.eval_batch_size=8",
    "trainer.max_steps=3",
    "optim.lr=1e-2",
    "checkpoint.every_n_steps=null",
]
METHODS = {
    "vera": ["method=vera", "method.r=16"],
    "delta_lora": ["method=delta_lora", "method.r=4", "method.warmup_steps=0"],  # W0 moves from step 1
    "qlora": ["method=qlora", "method.r=4", "method.dropout=0", "method.compute_dtype=float32"],
}


def worker(out: Path, overrides: list[str], cwd: Path) -> subprocess.Popen[str]:
    """`tests/ddp_worker.py` in `cwd` (its run directory), started in the background."""
    cwd.mkdir(parents=True, exist_ok=True)
    env = {**_env(cwd / "results"), "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "tests.ddp_worker", str(out), *overrides]
    return subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def ddp_and_single(tmp_path: Path, method: str) -> dict[str, Any]:
    """DDP 2 x 1 and one process x 2, run side by side (the DDP run mostly waits on its ranks)."""
    common = [*CLASSIFY, *METHODS[method]]
    runs = {
        "ddp": worker(
            tmp_path / "ddp", [*common, "trainer=ddp", "trainer.devices=2", "batch_size=1"], tmp_path / "d"
        ),
        "one": worker(tmp_path / "one", [*common, "batch_size=2"], tmp_path / "o"),
    }
    for name, proc in runs.items():
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name}: {output[-4000:]}"
    return {
        "rank0": load_file(str(tmp_path / "ddp" / "rank0.safetensors")),
        "rank1": load_file(str(tmp_path / "ddp" / "rank1.safetensors")),
        "one": load_file(str(tmp_path / "one" / "rank0.safetensors")),
        "record_ddp": json.loads((tmp_path / "ddp" / "record.json").read_text()),
        "record_one": json.loads((tmp_path / "one" / "record.json").read_text()),
    }


def check_ddp_matches_single(runs: dict[str, Any]) -> None:
    rank0, rank1, one = runs["rank0"], runs["rank1"], runs["one"]
    r_ddp, r_one = runs["record_ddp"], runs["record_one"]
    assert r_ddp["world_size"] == 2 and r_one["world_size"] == 1 and r_ddp["steps"] == r_one["steps"] == 3
    # every tensor (trainable, buffers, base, quantization state) is the same on both ranks
    assert rank0.keys() == rank1.keys() == one.keys()
    different = [k for k in rank0 if not torch.equal(rank0[k], rank1[k])]
    assert not different, different[:5]
    # and equal to one process's: exactly where nothing trained, within float rounding where it did
    for key, tensor in one.items():
        if tensor.is_floating_point():
            torch.testing.assert_close(rank0[key], tensor, rtol=0, atol=1e-4, msg=key)
        else:
            assert torch.equal(rank0[key], tensor), key
    for (s1, l1), (s2, l2) in zip(
        r_one["history"]["train_loss"], r_ddp["history"]["train_loss"], strict=True
    ):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-5)
    for key in ("test/loss", "val/loss"):
        assert r_ddp["metrics"][key] == pytest.approx(r_one["metrics"][key], rel=1e-5), key


@pytest.mark.slow
def test_vera_shared_projections_under_ddp(tmp_path: Path) -> None:
    """VeRA's frozen A, B (buffers shared by every layer) are the seeded ones on both ranks, as in one
    process; the trained b, d match one process's."""
    from peftbench.methods.vera import PROJECTIONS, VeRAProjections

    runs = ddp_and_single(tmp_path, "vera")
    check_ddp_matches_single(runs)
    rank0 = runs["rank0"]
    a, b = rank0[f"{PROJECTIONS}.vera_A"], rank0[f"{PROJECTIONS}.vera_B"]
    seeded = VeRAProjections(
        16, a.shape[1], b.shape[0], seed=0, dtype=torch.float32, device=torch.device("cpu")
    )
    assert torch.equal(a, seeded.vera_A) and torch.equal(b, seeded.vera_B)
    for name in (f"{PROJECTIONS}.vera_A", f"{PROJECTIONS}.vera_B"):
        assert torch.equal(runs["rank1"][name], rank0[name]) and torch.equal(runs["one"][name], rank0[name])
    assert any(k.endswith("vera_b") and t.abs().max() > 0 for k, t in rank0.items())  # b (init 0) trained


@pytest.mark.slow
def test_delta_lora_w_updates_under_ddp(tmp_path: Path) -> None:
    """Delta-LoRA's in-place W0 updates (outside autograd, so DDP does not sync them) come out identical on
    both ranks, from the all-reduced A, B, and equal to one process's."""
    from peftbench.models import load_model
    from tests.conftest import tiny_model_cfg

    runs = ddp_and_single(tmp_path, "delta_lora")
    check_ddp_matches_single(runs)
    init = load_model(tiny_model_cfg())[0].state_dict()
    adapted = [k for k in runs["rank0"] if k.endswith(".base.weight")]
    assert len(adapted) == 2 * 7  # every linear layer of both blocks
    for key in adapted:
        before = init[key.replace(".base.weight", ".weight")]
        moved_ddp, moved_one = runs["rank0"][key] - before, runs["one"][key] - before
        assert moved_one.abs().max() > 1e-3, key  # W0 really was updated
        assert (moved_ddp - moved_one).abs().max() <= 1e-3 * moved_one.abs().max(), key


@pytest.mark.slow
def test_qlora_4bit_base_under_ddp(tmp_path: Path) -> None:
    """bitsandbytes' CPU 4-bit path works under gloo DDP: the packed NF4 weights and their quantization
    state are identical on both ranks and to one process's; the LoRA tensors match."""
    runs = ddp_and_single(tmp_path, "qlora")
    check_ddp_matches_single(runs)
    packed = [k for k, t in runs["rank0"].items() if t.dtype == torch.uint8]
    assert len(packed) >= 2 * 7  # one packed weight per quantized linear (plus quantization state)


@pytest.mark.slow
def test_fsdp_on_cpu_is_one_clear_line(tmp_path: Path) -> None:
    """Lightning's FSDPStrategy runs on CUDA only: on a CPU-only machine `trainer=fsdp` stops before any
    training with one line that says so and what works here."""
    if torch.cuda.is_available():
        pytest.skip("FSDP runs on this machine's GPUs")
    env = {**_env(tmp_path / "results"), "PYTHONPATH": str(ROOT)}
    proc = run_module(
        "peftbench.run",
        [
            "experiment=smoke",
            "logger=none",
            "trainer=fsdp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            f"hydra.run.dir={tmp_path}/run",
        ],
        env,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: trainer.strategy="), proc.stderr[-3000:]
    assert "CUDA" in lines[0] and "trainer=ddp" in lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()
