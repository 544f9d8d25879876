"""Two-phase (continual) fine-tuning (peftbench/stages.py) on the tiny random Llama: two stages run, the
adapter is carried over, forgetting is the difference of the recorded metrics, resume skips finished
stages exactly, and bad stage configs are one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file

from peftbench.errors import ConfigError
from peftbench.methods.io import ADAPTER_FILE, load_adapter
from peftbench.module import PeftModule
from peftbench.stages import STATE_FILE, parse_stages, run_stages
from peftbench.validation import load_config
from tests.conftest import tiny_model_cfg
from tests.test_run import run_cli

# phase 1: sentiment with the causal LM's verbaliser; phase 2: headlines; 2 steps each, a few examples
SHRINK = [
    "experiment=two_phase",
    "model=tiny_llama",
    "logger=none",
    "batch_size=2",
    "evaluate_before=false",
    "checkpoint.every_n_steps=1",
    "stages.0.max_steps=2",
    "+stages.0.lr=0.05",
    "stages.0.task_overrides.split.val=2",
    "stages.0.task_overrides.split.test=8",
    "stages.0.task_overrides.split.max_train=8",
    "stages.1.max_steps=2",
    "stages.1.task_overrides.split.val=2",
    "stages.1.task_overrides.split.test=2",
    "stages.1.task_overrides.split.max_train=8",
    "stages.1.task_overrides.max_source_tokens=24",
]


def _config(tmp_path: Path, *extra: str) -> DictConfig:
    cfg = load_config([*SHRINK, f"results_dir={tmp_path / 'results'}", *extra])
    OmegaConf.set_struct(cfg, False)
    for stage in cfg.stages:
        stage.task_overrides.probe = None
        stage.task_overrides.eval_batch_size = 4
    cfg.stages[1].task_overrides.max_new_tokens = 2
    return cfg


def _run(cfg: DictConfig, run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[dict, dict, list]:
    """`run_stages` in `run_dir`; also returns the adapter state at the start of every stage's training."""
    starts: list[dict[str, torch.Tensor]] = []
    original = PeftModule.on_train_start

    def snapshot(self: PeftModule) -> None:
        starts.append({k: v.clone() for k, v in self.method.adapter_state_dict(self.model).items()})
        original(self)

    run_dir.mkdir(parents=True, exist_ok=True)
    with monkeypatch.context() as patch:
        patch.chdir(run_dir)  # outside Hydra the run directory is the working directory
        patch.setattr(PeftModule, "on_train_start", snapshot)
        record, objects = run_stages(cfg, "test-stages")
    return record.to_dict(), objects, starts  # the record as written (its JSON form)


def _accuracy(model: Any, task: Any) -> float:
    """Accuracy x 100 on the task's test split, by hand from the verbaliser's predictions."""
    right = total = 0
    for batch in task.test_dataloader(4):
        right += int((task.predict(model, batch) == batch["class_labels"]).sum())
        total += len(batch["class_labels"])
    return 100.0 * right / total


@pytest.fixture(scope="module")
def two_phase(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("stages")
    monkeypatch = pytest.MonkeyPatch()
    try:
        record, objects, starts = _run(_config(tmp), tmp / "run", monkeypatch)
    finally:
        monkeypatch.undo()
    return {"tmp": tmp, "record": record, "objects": objects, "starts": starts}


def test_two_stages_run_and_the_adapter_is_carried_over(two_phase: dict[str, Any]) -> None:
    record, starts = two_phase["record"], two_phase["starts"]
    assert [s["name"] for s in record["stages"]] == ["sentiment", "headlines"]
    assert [s["task"] for s in record["stages"]] == ["classification", "summarization"]
    assert [s["steps"] for s in record["stages"]] == [2, 2] and record["steps"] == 4
    assert [s["lr"] for s in record["stages"]] == [0.05, 1e-3]  # stage 1's own lr, stage 2 the run's
    assert record["task"] == "classification->summarization" and record["status"] == "ok"
    run_dir = Path(record["run_dir"])
    end_of = [load_file(str(Path(s["run_dir"]) / "adapter" / ADAPTER_FILE)) for s in record["stages"]]
    assert len(starts) == 2 and set(starts[1]) == set(end_of[0])
    for key, value in end_of[0].items():
        assert torch.equal(starts[1][key], value), key  # phase 2 starts where phase 1 ended
    trained = [k for k in end_of[0] if not torch.equal(starts[0][k], end_of[0][k])]
    assert trained  # phase 1 moved the adapter ...
    assert any(not torch.equal(end_of[0][k], end_of[1][k]) for k in end_of[0])  # ... and phase 2 again
    final = load_file(str(run_dir / "adapter" / ADAPTER_FILE))
    assert all(torch.equal(final[k], end_of[1][k]) for k in final)


def test_forgetting_is_the_difference_of_the_recorded_metrics(two_phase: dict[str, Any]) -> None:
    record, objects = two_phase["record"], two_phase["objects"]
    first = record["stages"][0]
    key = first["primary_metric"]
    assert key == "test/accuracy" and set(record["forgetting"]) == {"sentiment"}
    gone = record["forgetting"]["sentiment"]
    assert gone["after_own_stage"] == first["metrics"][key]
    assert gone["after_last_stage"] == first["metrics_after_last"][key]
    assert gone["change"] == pytest.approx(gone["after_last_stage"] - gone["after_own_stage"], abs=1e-12)
    assert "metrics_after_last" not in record["stages"][1]  # the last stage is not re-tested
    # the re-test saw the model after phase 2 (the tiny model's accuracy may not move; its loss does)
    assert first["metrics_after_last"]["test/loss"] != pytest.approx(first["metrics"]["test/loss"], abs=1e-6)
    # both numbers by hand: the phase-1 adapter on a fresh model, and the final model
    task = objects["tasks"][0]
    from peftbench.models import load_model

    fresh, _ = load_model(tiny_model_cfg())
    load_adapter(fresh, Path(first["run_dir"]) / "adapter")
    assert _accuracy(fresh.eval(), task) == pytest.approx(gone["after_own_stage"])
    assert _accuracy(objects["model"].eval(), task) == pytest.approx(gone["after_last_stage"])


def test_resume_trains_only_the_unfinished_stage_exactly(
    two_phase: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Interrupted after phase 1 (stages.json lists it alone, phase 2's files gone): launched again in the
    same directory, phase 1 is not trained again and phase 2 ends on the same adapter."""
    first_dir = Path(two_phase["record"]["run_dir"])
    run_dir = two_phase["tmp"] / "resumed"
    shutil.copytree(first_dir, run_dir)
    state = json.loads((run_dir / STATE_FILE).read_text())
    (run_dir / STATE_FILE).write_text(json.dumps({**state, "done": state["done"][:1]}))
    shutil.rmtree(run_dir / "stages" / "2-headlines")
    record, _, starts = _run(_config(two_phase["tmp"]), run_dir, monkeypatch)
    assert len(starts) == 1  # only phase 2 trained
    assert record["resumed_from"] == {"stages_done": 1} and record["run_id"] == state["run_id"]
    before = two_phase["record"]
    assert record["stages"][0]["metrics"] == before["stages"][0]["metrics"]
    assert record["forgetting"] == before["forgetting"]
    ours = load_file(str(run_dir / "adapter" / ADAPTER_FILE))
    theirs = load_file(str(first_dir / "adapter" / ADAPTER_FILE))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_resume_refuses_another_plan_or_a_path(
    two_phase: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = Path(two_phase["record"]["run_dir"])
    monkeypatch.chdir(run_dir)
    with pytest.raises(
        ConfigError, match=r"stages\.json was written by a stages run with other stages"
    ) as err:
        run_stages(_config(two_phase["tmp"], "stages.1.max_steps=3"))
    assert "\n" not in str(err.value)
    with pytest.raises(
        ConfigError, match=r"resume=.* is not supported for a stages run; accepted: resume=auto"
    ):
        run_stages(_config(two_phase["tmp"], f"resume={run_dir}"))


@pytest.mark.parametrize(
    ("stages", "needle"),
    [
        ("[]", r"stages=\[\] is not valid; accepted: a non-empty list"),
        ("[{name: a}]", r"stages\[0\]\.task=None is not valid; accepted: .*classification.*summarization"),
        ("[{task: nosuch}]", r"stages\[0\]\.task='nosuch' is not valid"),
        (
            "[{task: summarization, steps: 3}]",
            r"stages\[0\] has unknown key\(s\) steps; accepted: task, name",
        ),
        ("[{task: summarization, max_steps: 0}]", r"stages\[0\]\.max_steps=0 is not valid"),
        ("[{task: summarization, lr: -1}]", r"stages\[0\]\.lr=-1 is not valid"),
        (
            "[{task: summarization}, {task: summarization}]",
            r"stages\[1\]\.name='summarization' is already used",
        ),
        (
            "[{task: summarization, task_overrides: {colour: red}}]",
            r"task 'summarization' got unknown key\(s\) colour",
        ),
        (
            "[{task: summarization, task_overrides: {max_new_tokens: 0}}]",
            r"task\.max_new_tokens=0 is not valid",
        ),
    ],
)
def test_bad_stage_config_is_one_line_before_training(
    stages: str, needle: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config(["model=tiny_llama", f"results_dir={tmp_path}", f"+stages={stages}"])
    with pytest.raises(ConfigError, match=needle) as err:
        run_stages(cfg)
    assert "\n" not in str(err.value)
    assert not (tmp_path / STATE_FILE).exists()


def test_distributed_trainers_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config(["experiment=two_phase", "model=tiny_llama", "trainer=ddp", "trainer.devices=2"])
    with pytest.raises(ConfigError, match=r"stages with trainer.strategy='ddp'.*accepted: one process"):
        run_stages(cfg)
    assert parse_stages([{"task": "classification"}])[0].task_overrides == {}


@pytest.mark.slow  # ~12 s: a subprocess imports the stack
def test_cli_bad_stage_is_one_line(tmp_path: Path) -> None:
    result = run_cli(
        ["experiment=two_phase", "model=tiny_llama", "logger=none", "stages.0.task=nosuch"], tmp_path
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [errors[0]] and "stages[0].task='nosuch' is not valid; accepted:" in errors[0]
