"""Nothing lost: checkpoints, exact resume after a hard kill / SIGTERM / SIGINT, determinism.

The CLI runs use the tiny random Llama (`experiment=smoke`): 10 training examples in batches of 2 (5 batches
an epoch), 6 optimizer steps, a checkpoint every 2. A run killed part-way and resumed in the same run
directory must end with exactly the metrics, loss history and adapter of the uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from peftbench.checkpointing import AtomicCheckpointIO, load_checkpoint_file
from peftbench.errors import ConfigError
from peftbench.resume import candidates, find_checkpoint, resolve_resume
from peftbench.tasks.sampler import ResumableSampler

ROOT = Path(__file__).resolve().parents[1]
RESUMABLE = [
    "experiment=smoke",
    "logger=none",
    "trainer.max_steps=6",
    "checkpoint.every_n_steps=2",
    "checkpoint.keep_on_success=true",
    "trainer.deterministic=true",
    "task.split.max_train=10",
]


def _env(results: Path) -> dict[str, str]:
    return {
        **os.environ,
        "WANDB_MODE": "offline",
        "HF_HUB_OFFLINE": "1",
        "PEFTBENCH_RESULTS": str(results),
        "OMP_NUM_THREADS": "1",
    }


def run_cli(args: list[str], run_dir: Path, results: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "peftbench.run", *args, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        env=_env(results),
        capture_output=True,
        text=True,
        timeout=600,
    )


def run_and_signal(args: list[str], run_dir: Path, results: Path, wait_for: str, sig: int) -> int:
    """Start a run, send `sig` as soon as `<run_dir>/checkpoints/<wait_for>` exists; its exit code."""
    log = run_dir.parent / f"{run_dir.name}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "peftbench.run", *args, f"hydra.run.dir={run_dir}"],
            cwd=ROOT,
            env=_env(results),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        target = run_dir / "checkpoints" / wait_for
        deadline = time.monotonic() + 300
        while not target.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"no {wait_for} before the run ended:\n{log.read_text()[-3000:]}")
            time.sleep(0.002)
        os.kill(proc.pid, sig)
        return proc.wait(timeout=300)


def record(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "record.json").read_text())


def adapter(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = run_dir / "adapter" / "adapter.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    return load_file(str(path)), metadata


def assert_same_run(a: Path, b: Path) -> None:
    """Bit-identical metrics, loss/val history and adapter tensors."""
    ra, rb = record(a), record(b)
    assert rb["status"] == "ok" and rb["steps"] == ra["steps"]
    assert rb["metrics"] == ra["metrics"]
    assert rb["history"] == ra["history"]
    assert rb["train_tokens"] == ra["train_tokens"]
    (ta, ma), (tb, mb) = adapter(a), adapter(b)
    assert ma == mb and ta.keys() == tb.keys()
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"adapter tensors differ: {different[:3]}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run every resumed run must reproduce."""
    base = tmp_path_factory.mktemp("reference")
    result = run_cli(RESUMABLE, base / "run", base / "results")
    assert result.returncode == 0, result.stderr[-3000:]
    return base / "run"


# ----- the CLI: determinism, hard kill, SIGTERM, SIGINT ------------------------------------------------
def test_same_seed_same_config_gives_identical_results(reference: Path, tmp_path: Path) -> None:
    again = run_cli(RESUMABLE, tmp_path / "run", tmp_path / "results")
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_run(reference, tmp_path / "run")
    assert record(reference)["seeds"] == {"seed": 0, "data_order": 0, "model_init": 0}
    assert record(reference)["resumed_from"] is None


def test_checkpoints_hold_the_adapter_not_the_base(reference: Path) -> None:
    found = candidates(reference / "checkpoints")
    assert [p.name for p in found] == ["last.ckpt", "step=6.ckpt", "step=4.ckpt"]  # keep=2, plus last
    checkpoint = load_checkpoint_file(found[0])  # torch.load(weights_only=True)
    trainable = record(reference)["params"]["trainable"]
    assert sum(t.numel() for t in checkpoint["state_dict"].values()) == trainable
    assert all(".lora_" in k for k in checkpoint["state_dict"])  # no base weight, no embedding
    assert checkpoint["global_step"] == 6 and checkpoint["optimizer_states"] and checkpoint["lr_schedulers"]
    assert checkpoint["peftbench_module"]["loss_history"] == [
        tuple(x) for x in record(reference)["history"]["train_loss"]
    ]
    assert not list((reference / "checkpoints").glob(".*.tmp"))  # atomic writes leave no temp file


def test_hard_kill_then_resume_is_exact_and_skips_a_truncated_checkpoint(
    reference: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    code = run_and_signal(RESUMABLE, run_dir, tmp_path / "results", "step=4.ckpt", signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert not (run_dir / "record.json").exists(), "the run finished before the kill: nothing was tested"
    last = run_dir / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a write cut short
    resumed = run_cli(RESUMABLE, run_dir, tmp_path / "results")  # resume=auto, same run dir
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    origin = record(run_dir)["resumed_from"]
    assert origin["step"] >= 4 and origin["checkpoint"].endswith(f"step={origin['step']}.ckpt")
    assert origin["skipped"] and origin["skipped"][0].startswith("last.ckpt")
    assert_same_run(reference, run_dir)


def test_sigterm_stops_with_a_checkpoint_and_an_interrupted_record_then_resumes(
    reference: Path, tmp_path: Path
) -> None:
    run_dir, results = tmp_path / "run", tmp_path / "results"
    code = run_and_signal(RESUMABLE, run_dir, results, "step=2.ckpt", signal.SIGTERM)
    assert code == 128 + signal.SIGTERM
    stopped = record(run_dir)
    assert stopped["status"] == "interrupted" and stopped["signal"] == "SIGTERM", stopped.get("error")
    checkpoint = load_checkpoint_file(stopped["checkpoint"])
    assert checkpoint["global_step"] == stopped["step"] >= 2
    assert f"hydra.run.dir={run_dir}" in stopped["resume"]
    resumed = run_cli(RESUMABLE, run_dir, results)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert record(run_dir)["resumed_from"]["step"] == stopped["step"]
    assert_same_run(reference, run_dir)
    # the resumed run's record replaces the interrupted one in the results store
    stored = [json.loads(p.read_text()) for p in (results / "smoke").glob("*.json")]
    assert [r["status"] for r in stored] == ["ok"] and stored[0]["run_id"] == stopped["run_id"]


def test_sigint_stops_with_a_checkpoint_and_exits_non_zero(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    code = run_and_signal(RESUMABLE, run_dir, tmp_path / "results", "step=2.ckpt", signal.SIGINT)
    assert code == 128 + signal.SIGINT
    stopped = record(run_dir)
    assert stopped["status"] == "interrupted" and stopped["signal"] == "SIGINT"
    assert load_checkpoint_file(stopped["checkpoint"])["global_step"] == stopped["step"]


@pytest.mark.slow  # three CLI runs, about a minute on 2 shared cores
def test_delta_lora_resumes_exactly(tmp_path: Path) -> None:
    """Delta-LoRA's state is not only parameters: W0 moves after every step from K = 1 on."""
    args = [*RESUMABLE, "method=delta_lora", "method.warmup_steps=1"]
    whole = run_cli(args, tmp_path / "whole", tmp_path / "results")
    assert whole.returncode == 0, whole.stderr[-3000:]
    code = run_and_signal(args, tmp_path / "cut", tmp_path / "results", "step=2.ckpt", signal.SIGTERM)
    assert code == 128 + signal.SIGTERM
    resumed = run_cli(args, tmp_path / "cut", tmp_path / "results")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(tmp_path / "whole", tmp_path / "cut")
    assert any(k.endswith("base.weight") for k in adapter(tmp_path / "cut")[0])


def test_resuming_with_another_config_is_one_line(reference: Path, tmp_path: Path) -> None:
    result = run_cli([*RESUMABLE, f"resume={reference}", "method.r=8"], tmp_path / "run", tmp_path / "res")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "method.r=16" in errors[0] and "method.r=8" in errors[0], result.stderr
    assert "Traceback" not in result.stderr


# ----- units: checkpoint files, resolution, the sampler ------------------------------------------------
def _fake_checkpoint(path: Path, step: int) -> None:
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(2)}, "global_step": step}, path)


def test_find_checkpoint_skips_damaged_and_unsafe_files(tmp_path: Path) -> None:
    _fake_checkpoint(tmp_path / "step=2.ckpt", 2)
    _fake_checkpoint(tmp_path / "step=4.ckpt", 4)
    _fake_checkpoint(tmp_path / "last.ckpt", 4)
    (tmp_path / ".last.ckpt.abc.tmp").write_bytes(b"half a write")
    found, skipped = find_checkpoint(tmp_path)
    assert found is not None and found.path.name == "last.ckpt" and not skipped
    (tmp_path / "last.ckpt").write_bytes((tmp_path / "last.ckpt").read_bytes()[:100])  # truncated
    torch.save({"state_dict": {}, "x": ResumableSampler(3)}, tmp_path / "step=4.ckpt")  # needs unpickling
    found, skipped = find_checkpoint(tmp_path)
    assert found is not None and found.path.name == "step=2.ckpt" and found.step == 2
    assert [s.split(":")[0] for s in skipped] == ["last.ckpt", "step=4.ckpt"]
    assert "Weights only load failed" in skipped[1] or "weights_only" in skipped[1].lower()


def test_resolve_resume_accepts_run_dirs_and_files_and_names_bad_paths(tmp_path: Path) -> None:
    assert resolve_resume(None, tmp_path) is None and resolve_resume("auto", tmp_path) is None
    _fake_checkpoint(tmp_path / "checkpoints" / "step=3.ckpt", 3)
    assert resolve_resume("auto", tmp_path).step == 3
    assert resolve_resume(str(tmp_path), tmp_path / "elsewhere").step == 3
    assert resolve_resume(str(tmp_path / "checkpoints" / "step=3.ckpt"), tmp_path).step == 3
    (tmp_path / "bad.ckpt").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(ConfigError, match="not a readable checkpoint"):
        resolve_resume(str(tmp_path / "bad.ckpt"), tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_resume(str(tmp_path / "nowhere"), tmp_path)


def test_sampler_order_depends_on_seed_and_epoch_only_and_resumes_mid_epoch() -> None:
    sampler = ResumableSampler(10, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(10)) and first == list(ResumableSampler(10, seed=3))
    assert first != list(ResumableSampler(10, seed=4))
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first and sorted(second) == list(range(10))
    fresh = ResumableSampler(10, seed=3)
    fresh.resume_at(epoch=1, skip=4)
    fresh.set_epoch(1)
    assert list(fresh) == second[4:] and len(fresh) == 10  # len stays the whole epoch
    assert list(fresh) == second  # the skip applies once


def test_sampler_shards_like_one_process_with_a_bigger_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    import peftbench.tasks.sampler as sampler_module

    whole = list(ResumableSampler(11, seed=0))
    shards = []
    for rank in (0, 1):
        monkeypatch.setattr(sampler_module, "replicas", lambda rank=rank: (2, rank))
        shard = ResumableSampler(11, seed=0)
        assert len(shard) == 6
        shards.append(list(shard))
    padded = whole + whole[:1]
    for k in range(3):  # batch k of size 2 on each rank == batch k of size 4 in one process
        assert sorted(shards[0][2 * k : 2 * k + 2] + shards[1][2 * k : 2 * k + 2]) == sorted(
            padded[4 * k : 4 * k + 4]
        )
