"""task=mixture (peftbench/tasks/mixture.py): the union of several tasks' training sets in one-task batches;
each task scored on its own split with its own metrics, exactly as when scored alone; score = the mean of the
raw primary metrics; bad sub-task names refused in one line."""

from __future__ import annotations

import copy
from collections import Counter
from typing import Any

import pytest

from peftbench.errors import ConfigError
from peftbench.evaluate import score
from peftbench.tasks import build_task
from peftbench.tasks.mixture import TASK_KEY, MixtureTask

SMALL = {"split": {"val": 3, "test": 5, "max_train": 7}, "probe": None}
TASKS = {
    "classification": SMALL,
    "topic_classification": SMALL,
    "summarization": {**SMALL, "max_new_tokens": 3, "max_source_tokens": 24},
}


@pytest.fixture(scope="module")
def mixture(tiny_model_and_tokenizer: tuple[Any, Any]) -> MixtureTask:
    task = build_task({"name": "mixture", "tasks": TASKS})
    task.setup(tiny_model_and_tokenizer[1], seed=3)
    assert task.head(tiny_model_and_tokenizer[0]) is None  # picks the verbaliser on a causal LM
    return task


def test_training_batches_hold_one_task_each_and_cover_every_example(mixture: MixtureTask) -> None:
    sizes = mixture.part_sizes()
    assert [p.name for p in mixture.parts] == list(TASKS)
    assert mixture.split_sizes()["train"] == sum(s["train"] for s in sizes.values()) == 21
    seen: Counter[int] = Counter()
    for batch in mixture.train_dataloader(batch_size=2):
        assert batch["input_ids"].shape[0] <= 2
        seen[batch[TASK_KEY]] += batch["input_ids"].shape[0]
    assert [seen[i] for i in range(3)] == [sizes[name]["train"] for name in TASKS]
    order = [b[TASK_KEY] for b in mixture.train_dataloader(batch_size=2)]
    assert order != sorted(order), "the tasks' batches are shuffled together"


def test_each_task_is_scored_as_when_scored_alone(
    mixture: MixtureTask, tiny_model_and_tokenizer: tuple[Any, Any]
) -> None:
    model = copy.deepcopy(tiny_model_and_tokenizer[0])
    together = score(model, mixture, "test", batch_size=2)
    primaries = []
    for part in mixture.parts:
        alone = score(model, part, "test", batch_size=2)
        for key, value in alone.items():
            if key != "test/loss":
                assert together[f"test/{part.name}/{key.removeprefix('test/')}"] == pytest.approx(value), key
        primaries.append(alone[f"test/{part.primary_metric}"])
    assert together["test/score"] == pytest.approx(sum(primaries) / 3)
    assert {"test/classification/macro_f1", "test/summarization/rouge_l"} <= set(together)


@pytest.mark.parametrize(
    ("tasks", "needle"),
    [
        ({"nosuch": None}, "task.tasks has 'nosuch'; accepted: classification"),
        ({"mixture": None}, "task.tasks has 'mixture'"),
        ({"classification": 3}, "task.tasks.classification=3 is not valid"),
        ({}, "task.tasks={} is not valid"),
        ({"classification": {"colour": "red"}}, "unknown key(s) colour"),
    ],
)
def test_bad_tasks_are_one_line(tasks: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        MixtureTask(tasks=tasks)
    assert needle in str(err.value) and "\n" not in str(err.value)
