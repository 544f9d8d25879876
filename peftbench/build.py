"""Build one run: the model loaded, the task set up on its tokenizer, the method applied (a task's head
trains beside it). `train(cfg, built, run_dir)` (peftbench/train.py) then fits and tests it.

A stages run (peftbench/stages.py) builds the model and the method once (`build_base`) and hands the same
model to each stage's task in turn (`attach_task`).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from torch import nn

from peftbench.budget import apply_budget
from peftbench.lr_search import apply_tuned
from peftbench.validation import validate_config


@dataclass
class Built:
    """What a run trains: the model with the method applied, its tokenizer, the method, the task (set up on
    the tokenizer) and the task's head (None when it adds none)."""

    model: nn.Module
    tokenizer: Any
    method: Any
    task: Any
    head: nn.Module | None
    base_total: int  # parameters of the model before the method was applied


def output_dir() -> Path:
    """The run directory: Hydra's output directory, or the working directory outside `@hydra.main`."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # composed outside @hydra.main (tests, notebooks)
        return Path.cwd()


def new_run_id(cfg: DictConfig) -> str:
    return f"{cfg.study}-{cfg.method.name}-{cfg.task.name}-seed{cfg.seed}-{uuid.uuid4().hex[:8]}"


def prepare(cfg: DictConfig) -> tuple[Any, Any]:
    """The config rewritten, once, before anything is built: this method's tuned values (`tuned=`,
    peftbench/lr_search.py) and its size fitted to `budget.trainable_params` (peftbench/budget.py); then every
    check that needs neither model nor data. Returns the `(method, task)` the config describes."""
    apply_tuned(cfg)
    apply_budget(cfg)
    return validate_config(cfg)


def seed_everything(seed: int) -> None:
    import lightning as L

    L.seed_everything(seed, workers=True, verbose=False)


def build(cfg: DictConfig, method: Any, task: Any) -> Built:
    """Seed, load the model, set the task up, add its head and apply the method (the head trains beside it).
    ConfigError when the training split cannot fill one batch."""
    from peftbench.models import load_model
    from peftbench.models.params import count_parameters

    seed_everything(cfg.seed)
    model, tokenizer = load_model(cfg.model)
    task.setup(tokenizer, cfg.seed)
    base_total = count_parameters(model)
    head = task.head(model)
    method.apply(model, head=head)
    return _ready(cfg, Built(model, tokenizer, method, task, head, base_total))


def build_base(cfg: DictConfig, method: Any) -> Built:
    """Seed, load the model and apply the method, without a task (a stages run attaches one per stage)."""
    from peftbench.models import load_model
    from peftbench.models.params import count_parameters

    seed_everything(cfg.seed)
    model, tokenizer = load_model(cfg.model)
    base_total = count_parameters(model)
    method.apply(model)
    return Built(model, tokenizer, method, None, None, base_total)


def attach_task(cfg: DictConfig, base: Built, task: Any) -> Built:
    """`base` (model and method) with `task` set up on it; a head the task adds (a classifier) trains beside
    the adapter, as `method.apply(model, head=...)` makes it."""
    task.setup(base.tokenizer, cfg.seed)
    head = task.head(base.model)
    if head is not None:
        head.requires_grad_(True)
    set_switches = getattr(base.model, "set_freeze_switches", None)
    if callable(set_switches):  # an image model: this stage's freeze switches (stages[k].freeze)
        set_switches(cfg.model.get("vision") or {})
        base.method.mark_trainable(base.model, head)
    return _ready(cfg, Built(base.model, base.tokenizer, base.method, task, head, base.base_total))


def check_modalities(model: nn.Module, task: Any) -> None:
    """A one-line ConfigError when the model and the task disagree about images (their `takes_images`
    capabilities): an image model with a text-only task, a text model with an image task."""
    from peftbench.errors import ConfigError
    from peftbench.models.multimodal import takes_images

    if takes_images(model) and not getattr(task, "takes_images", False):
        raise ConfigError(
            f"task={task.name!r} has no images but the model is an image model ({type(model).__name__}); "
            "accepted: an image task (task=scenes) or a text model (e.g. model=smollm2_135m)"
        )
    if getattr(task, "takes_images", False) and not takes_images(model):
        raise ConfigError(
            f"task={task.name!r} needs an image model; {type(model).__name__} takes no images; accepted: "
            "model=vision_smollm2 (or model.name_or_path=<a local LLaVA directory>)"
        )


def _ready(cfg: DictConfig, built: Built) -> Built:
    from peftbench.tasks.checks import check_enough_training_data
    from peftbench.validation import processes

    task = built.task
    check_modalities(built.model, task)
    check_enough_training_data(task.name, task.split_sizes()["train"], cfg.batch_size, processes(cfg.trainer))
    task.use_reference(lambda: built.method.disabled(built.model))
    return built
