"""Hydra composition of every config, bad input before training, and one end-to-end run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from peftbench.errors import ConfigError
from peftbench.methods import build_method

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
GROUPS = ("method", "model", "task", "trainer", "optim", "logger")

# A fast, tiny run: random 2-layer Llama, a handful of BBC examples, W&B offline.
TINY = [
    "model=tiny_llama",
    "batch_size=2",
    "task.split.val=4",
    "task.split.test=4",
    "task.split.max_train=8",
    "task.max_source_tokens=32",
    "task.max_new_tokens=4",
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in GROUPS for o in options(g)])
def test_every_config_option_composes(group: str, option: str) -> None:
    cfg = compose_config([f"{group}={option}"])
    resolved = OmegaConf.to_container(cfg, resolve=False)
    assert resolved[group] is not None
    if group == "method":
        build_method(OmegaConf.to_container(cfg.method, resolve=True))


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes(experiment: str) -> None:
    cfg = compose_config([f"experiment={experiment}"])
    build_method(OmegaConf.to_container(cfg.method, resolve=True))


def run_cli(args: list[str], tmp_path: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "PEFTBENCH_RESULTS": str(tmp_path)}
    return subprocess.run(
        [sys.executable, "-m", "peftbench.run", *args, f"hydra.run.dir={tmp_path}/run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("method.r=0", "method.r=0"),
        ("model.name_or_path=/nonexistent/model", "/nonexistent/model"),
        ("task.source_column=body", "body"),
        ("method.target_modules=[qkv]", "qkv"),
        ("optim.lr=-1", "optim.lr=-1"),
        ("task.split.max_train=1", "1 training examples, fewer than one batch of batch_size=2"),
    ],
)
def test_bad_input_is_one_clear_line_before_training(override: str, needle: str, tmp_path: Path) -> None:
    result = run_cli([*TINY, "logger=none", override], tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and needle in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "Epoch 0" not in result.stderr + result.stdout  # nothing trained
    record = json.loads((tmp_path / "run" / "record.json").read_text())
    assert record["status"] == "failed" and needle in record["error"]


@pytest.mark.parametrize(
    "override", ["method=nosuchmethod", "model=nosuchmethod", "task=nosuchmethod", "method=lora,nosuchmethod"]
)
def test_unknown_group_option_is_one_line_naming_the_accepted_ones(override: str, tmp_path: Path) -> None:
    result = run_cli([override], tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "nosuchmethod" in lines[0] and "accepted:" in lines[0], result.stderr


def test_build_method_rejects_unknown_names_and_keys() -> None:
    with pytest.raises(ConfigError, match=r"method='nosuch'"):
        build_method({"name": "nosuch"})
    with pytest.raises(ConfigError, match=r"method.rank"):
        build_method({"name": "lora", "rank": 4})


def test_end_to_end_run_writes_a_record(tmp_path: Path) -> None:
    result = run_cli([*TINY, "study=e2e", "seed=3"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "record.json").read_text())
    stored = list((tmp_path / "e2e").glob("*.json"))
    assert len(stored) == 1 and json.loads(stored[0].read_text()) == record
    assert record["status"] == "ok" and record["method"] == "lora" and record["seed"] == 3
    assert record["steps"] == 2
    for key in ("test/rouge_l", "test/loss", "test_before/rouge_l", "val/loss"):
        assert key in record["metrics"]
    params = record["params"]
    assert 0 < params["trainable"] < params["total"] and params["base_modified"] is False
    assert params["adapter_bytes"] > 0 and (tmp_path / "run" / "adapter" / "adapter.safetensors").exists()
    assert record["memory"]["peak_train_bytes"] > 0 and record["tokens_per_s"] > 0
    assert len(record["history"]["train_loss"]) == 2
    assert record["env"]["versions"]["torch"] and record["config"]["method"]["r"] == 16
    assert list((tmp_path / "run").glob("wandb/offline-run-*")), "no offline W&B run was written"


def test_untuned_score_is_measured_once_per_study(tmp_path: Path) -> None:
    """A second run of the same study reuses the first run's untuned test metrics."""
    first = run_cli([*TINY, "study=once", "logger=none"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    record_1 = json.loads((tmp_path / "run" / "record.json").read_text())
    second = run_cli([*TINY, "study=once", "logger=none", "seed=1", "method=lora_plus"], tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    record_2 = json.loads((tmp_path / "run" / "record.json").read_text())
    assert record_1["time"]["eval_before_reused"] is False and record_2["time"]["eval_before_reused"] is True
    before = {k: v for k, v in record_1["metrics"].items() if k.startswith("test_before/")}
    assert before and all(record_2["metrics"][k] == v for k, v in before.items())
    assert len(list((tmp_path / "once" / "untuned").glob("*.json"))) == 1


def test_fast_dev_run(tmp_path: Path) -> None:
    result = run_cli([*TINY, "trainer.fast_dev_run=true", "evaluate_before=false"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "record.json").read_text())["status"] == "ok"


def test_help_and_cfg_job(tmp_path: Path) -> None:
    env = {**os.environ, "WANDB_MODE": "offline"}
    shown = subprocess.run(
        [sys.executable, "-m", "peftbench.run", "--cfg", "job", "method=lora", "method.r=8"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0 and "r: 8" in shown.stdout
    helped = subprocess.run(
        [sys.executable, "-m", "peftbench.run", "--help"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert helped.returncode == 0 and "method: " in helped.stdout


def test_non_finite_loss_stops_the_run_and_is_recorded(tmp_path: Path) -> None:
    """An absurd learning rate drives the loss to inf/NaN: the run stops with the step and a cause."""
    result = run_cli(
        [
            *TINY,
            "logger=none",
            "evaluate_before=false",
            "optim.lr=1e12",
            "trainer.max_steps=6",
            "trainer.gradient_clip_val=null",
            "method=full",
        ],
        tmp_path,
    )
    assert result.returncode != 0
    record = json.loads((tmp_path / "run" / "record.json").read_text())
    assert record["status"] == "failed" and record["failure"] == "nan", record.get("error")
    assert "non-finite loss at step" in record["error"] and "optim.lr" in record["error"]
