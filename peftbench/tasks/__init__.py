"""Task registry: `task=<name>` picks a class here; the rest of the task config are its kwargs."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any

from peftbench.errors import ConfigError
from peftbench.tasks.base import Task

#: `task=<name>` -> "module:Class". Classes are imported on first use, so that importing one task module
#: (or `peftbench.rl`, which uses the text helpers under `peftbench.tasks`) never imports every other task:
#: the RL task imports `peftbench.rl`, which imports `peftbench.tasks.*`, a cycle if this were eager.
TASKS: dict[str, str] = {
    "summarization": "peftbench.tasks.summarization:SummarizationTask",
    "classification": "peftbench.tasks.classification:ClassificationTask",
    # the same class as classification; conf/task/topic_classification.yaml
    "topic_classification": "peftbench.tasks.classification:ClassificationTask",
    "instruction": "peftbench.tasks.instruction:InstructionTask",
    "preference": "peftbench.tasks.preference:PreferenceTask",
    # Bradley-Terry on the preference pairs; a run can serve as a reward
    "reward_model": "peftbench.tasks.reward_model:RewardModelTask",
    # RL from feedback: one class, three configs (conf/task/grpo|rloo|ppo.yaml)
    "grpo": "peftbench.tasks.reinforce:ReinforceTask",
    "rloo": "peftbench.tasks.reinforce:ReinforceTask",
    "ppo": "peftbench.tasks.reinforce:ReinforceTask",
    "mixture": "peftbench.tasks.mixture:MixtureTask",  # the union of several tasks (conf/task/mixture.yaml)
    "dialogue": "peftbench.tasks.dialogue:DialogueTask",
    # images: conf/task/scenes.yaml, needs an image model (model=vision_smollm2)
    "scenes": "peftbench.tasks.scenes:ScenesTask",
}

#: the task classes this package exports by name (imported lazily, see `__getattr__`)
_EXPORTED = {path.split(":")[1]: path for path in TASKS.values()}


def task_class(name: str) -> type:
    """The class registered for `task=<name>`; ConfigError naming the accepted names otherwise."""
    if name not in TASKS:
        raise ConfigError(f"task.name={name!r} is not valid; accepted: {', '.join(TASKS)}")
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def __getattr__(attr: str) -> Any:
    """`from peftbench.tasks import SummarizationTask` and kin, imported on first use."""
    if attr in _EXPORTED:
        module, cls = _EXPORTED[attr].split(":")
        return getattr(importlib.import_module(module), cls)
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


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
    if name not in TASKS:  # not a string, or not registered
        raise ConfigError(f"task.name={name!r} is not valid; accepted: {', '.join(TASKS)}")
    cls = task_class(name)
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
    "task_class",
]
