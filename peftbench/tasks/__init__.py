"""Task registry: `task=<name>` picks a class here; the rest of the task config are its kwargs."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from peftbench.errors import ConfigError
from peftbench.tasks.base import Task
from peftbench.tasks.classification import ClassificationTask
from peftbench.tasks.dialogue import DialogueTask
from peftbench.tasks.instruction import InstructionTask
from peftbench.tasks.mixture import MixtureTask
from peftbench.tasks.preference import PreferenceTask
from peftbench.tasks.reinforce import ReinforceTask
from peftbench.tasks.reward_model import RewardModelTask
from peftbench.tasks.scenes import ScenesTask
from peftbench.tasks.summarization import SummarizationTask

TASKS: dict[str, type] = {
    "summarization": SummarizationTask,
    "classification": ClassificationTask,
    "topic_classification": ClassificationTask,  # the same class; conf/task/topic_classification.yaml
    "instruction": InstructionTask,
    "preference": PreferenceTask,
    "reward_model": RewardModelTask,  # Bradley-Terry on the preference pairs; a run can serve as a reward
    "grpo": ReinforceTask,  # RL from feedback: one class, three configs (conf/task/grpo|rloo|ppo.yaml)
    "rloo": ReinforceTask,
    "ppo": ReinforceTask,
    "mixture": MixtureTask,  # the union of several tasks (conf/task/mixture.yaml)
    "dialogue": DialogueTask,
    "scenes": ScenesTask,  # images: conf/task/scenes.yaml, needs an image model (model=vision_smollm2)
}


def build_task(cfg: Any) -> Task:
    """Build a task from the Hydra `task` config (a DictConfig or a plain mapping).

    `name` selects the class in `TASKS`; every other key (except `_target_`-style keys starting with `_`)
    is passed as a keyword argument. Unknown names or keys give a one-line ConfigError.
    """
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"task config={cfg!r} is not valid; accepted: a mapping with a `name` key")
    params = {str(k): v for k, v in cfg.items() if not str(k).startswith("_")}
    name = params.get("name")
    if name not in TASKS:
        raise ConfigError(f"task.name={name!r} is not valid; accepted: {', '.join(TASKS)}")
    cls = TASKS[name]
    accepted = [p for p in inspect.signature(cls).parameters if p != "self"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ConfigError(
            f"task {name!r} got unknown key(s) {', '.join(unknown)}; accepted: {', '.join(accepted)}"
        )
    return cls(**params)


__all__ = [
    "TASKS",
    "ClassificationTask",
    "DialogueTask",
    "InstructionTask",
    "MixtureTask",
    "PreferenceTask",
    "ReinforceTask",
    "RewardModelTask",
    "ScenesTask",
    "SummarizationTask",
    "Task",
    "build_task",
]
