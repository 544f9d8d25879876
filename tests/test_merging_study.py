"""The merging study's fast parts (peftbench/merging/study.py, study_report.py): the overrides it gives each
run, its resume guard, its choice of setting, and the report's ranking and intervals on hand-made rows. The
whole study on tiny_llama takes minutes: it is run by hand (docs/merging.md), not here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from peftbench.errors import ConfigError
from peftbench.merging import study as S
from peftbench.merging.study_report import interval, summarise, write_report


def test_flow_writes_hydra_override_values() -> None:
    value = {"split": {"val": 8, "test": None}, "flag": True, "words": ["a b", "c"], "x": 0.5}
    assert S.flow(value) == "{split: {val: 8, test: null}, flag: true, words: ['a b', 'c'], x: 0.5}"


def test_each_run_gets_its_task_overrides(tmp_path: Path) -> None:
    study = S.load_study(["merging.tasks.summarization.max_new_tokens=4", "trainer.max_steps=3"], tmp_path)
    assert study.run_overrides == ["trainer.max_steps=3"]
    single = S.task_overrides(study, "summarization")
    assert single[0] == "task=summarization" and "task.max_new_tokens=4" in single
    mixture = S.task_overrides(study, "mixture")
    assert mixture[:2] == ["task=mixture", "~task.tasks"]
    assert mixture[2].startswith("+task.tasks={classification: {") and "max_new_tokens: 4" in mixture[2]


def test_a_study_directory_refuses_other_run_overrides_but_takes_more_methods(tmp_path: Path) -> None:
    argv = ["merging.out=o", "merging.methods=[lora]", "trainer.max_steps=3"]
    S.save_state(S.load_study(argv, tmp_path), argv)
    S.load_study(
        ["merging.out=o", "merging.methods=[lora,ia3]", "merging.seeds=[0,1]", "trainer.max_steps=3"],
        tmp_path,
    )
    with pytest.raises(ConfigError, match="holds a study with run overrides") as err:
        S.load_study(["merging.out=o", "trainer.max_steps=4"], tmp_path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["merging.colour=red"], "merging.colour=red"),
        (["merging.combinations=[average]"], "merging.combinations=['average']"),
        (["merging.densities=[0]"], "density=0"),
        (["merging.weights=[1,2]"], "merging.weights=[1, 2]"),
    ],
)
def test_bad_study_keys_are_one_line(argv: list[str], needle: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not valid") as err:
        S.load_study(argv, tmp_path)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_normalised_mean_skips_tasks_without_a_single_task_score() -> None:
    norm = S.normalised({"a": 40.0, "b": 3.0}, {"a": 80.0, "b": 0.0})
    assert norm["a"] == 0.5 and math.isnan(norm["b"]) and S.mean(list(norm.values())) == 0.5


def test_interval_is_the_t_interval_over_seeds() -> None:
    centre, half = interval([0.8, 0.9, 1.0])
    assert centre == pytest.approx(0.9) and half == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    assert interval([0.7]) == (0.7, None)


def test_report_ranks_methods_by_the_combination_chosen_on_validation(tmp_path: Path) -> None:
    """ia3's best test combination (ties) was not its best on validation (task arithmetic): the ranking
    uses the validation choice, never the test scores."""
    study = S.load_study(["merging.out=o", "merging.combinations=[task_arithmetic,ties]"], tmp_path)
    tasks = study.tasks
    rows = {
        "selection.jsonl": [
            {"method": "lora", "how": "ties", "density": 0.5, "scale": 1.0, "mean": 0.9},
            {"method": "lora", "how": "task_arithmetic", "density": 1.0, "scale": 0.5, "mean": 0.8},
            {"method": "ia3", "how": "task_arithmetic", "density": 1.0, "scale": 1.0, "mean": 0.7},
            {"method": "ia3", "how": "ties", "density": 0.2, "scale": 1.0, "mean": 0.6},
        ],
        "test.jsonl": [],
        "diagnostics.jsonl": [
            {
                "method": m,
                "seed": s,
                "sign_conflict": 0.4,
                "sign_conflict_trimmed": 0.3,
                "cosine": {"a|b": 0.1},
            }
            for m in ("lora", "ia3")
            for s in (0, 1)
        ],
    }
    means = {("lora", "ties"): [0.95, 0.85], ("lora", "task_arithmetic"): [0.5, 0.5]}
    means |= {("ia3", "ties"): [0.99, 0.99], ("ia3", "task_arithmetic"): [0.6, 0.7]}
    means |= {(m, h): [v, v] for m in ("lora", "ia3") for h, v in (("base", 0.3), ("mixture", 1.1))}
    for (method, how), values in means.items():
        for seed, value in enumerate(values):
            norm = {t: value for t in tasks}
            rows["test.jsonl"].append(
                {"method": method, "seed": seed, "how": how, "normalised": norm, "mean": value, "scale": 1.0}
            )
    study.out.mkdir(parents=True)
    for name, found in rows.items():
        (study.out / name).write_text("".join(json.dumps(r) + "\n" for r in found))
    summary = summarise(study)
    assert [m["method"] for m in summary["methods"]] == ["lora", "ia3"]
    lora, ia3 = summary["methods"]
    assert lora["chosen"] == "ties" and lora["score"][0] == pytest.approx(0.9) and lora["seeds"] == 2
    assert ia3["chosen"] == "task_arithmetic" and ia3["score"][0] == pytest.approx(0.65)
    assert lora["base"][0] == pytest.approx(0.3) and lora["mixture"][0] == pytest.approx(1.1)
    report = write_report(study).read_text()
    assert "| 1 | lora | ties |" in report and "| 2 | ia3 | task_arithmetic |" in report
    assert (study.out / "mergeability.png").stat().st_size > 1000
