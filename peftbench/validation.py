"""Checks of a composed config that need neither the model nor the data.

Every bad value ends as one `ConfigError` line naming the key and what is accepted, before anything is
loaded; `load_config` turns Hydra's own composition errors into the same one-line form.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from peftbench.errors import ConfigError, bad_value, check_int, is_int, is_number


# ----- checks before anything is loaded ------------------------------------------------------------------
def _number(key: str, value: Any, accepted: str, ok: Any) -> None:
    if not is_number(value) or not ok(value):
        raise bad_value(key, value, accepted)


def _check_optim_types(optim: Any) -> None:
    """Types first, so `check_optim_config`'s comparisons never meet a string or a list."""
    for key in ("name", "schedule"):
        if not isinstance(optim.get(key), str):
            raise bad_value(f"optim.{key}", optim.get(key), "a name (see conf/optim/adamw.yaml)")
    _number("optim.lr", optim.get("lr"), "a finite number > 0", lambda v: 0 < v < float("inf"))
    _number("optim.weight_decay", optim.get("weight_decay"), "a number >= 0", lambda v: v >= 0)
    _number("optim.warmup_ratio", optim.get("warmup_ratio"), "a number in [0, 1)", lambda v: 0 <= v < 1)
    _number("optim.eps", optim.get("eps"), "a number > 0", lambda v: v > 0)
    betas = optim.get("betas")
    if (
        not isinstance(betas, Sequence)
        or isinstance(betas, str)
        or len(betas) != 2
        or any(not is_number(b) or not 0 <= b < 1 for b in betas)
    ):
        raise bad_value("optim.betas", betas, "two numbers in [0, 1), e.g. [0.9, 0.999]")


def _type_matches(value: Any, hint: Any) -> bool:
    """Whether a config value fits a method field's annotation (int for float allowed; bool only for bool;
    floats finite)."""
    import math
    import types
    import typing

    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return is_int(value)
    if hint is float:
        return is_number(value) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return isinstance(value, list) and all(_type_matches(v, item) for v in value)
    return True  # another annotation: the method's own validate() judges


def _describe(hint: Any) -> str:
    import typing

    if typing.get_origin(hint) is not None and typing.get_args(hint):
        parts = [_describe(a) for a in typing.get_args(hint)]
        return " or ".join(dict.fromkeys(parts))
    names = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}
    return names.get(hint, "null" if hint is type(None) else getattr(hint, "__name__", str(hint)))


def check_method_types(values: dict[str, Any]) -> None:
    """Each `method.*` value has its field's type (the dataclass annotations of the method class), before
    the method's own range checks compare it with numbers."""
    import dataclasses
    import typing

    import peftbench.methods  # noqa: F401  (every method registers itself)
    from peftbench.methods.registry import METHODS

    cls = METHODS.get(values.get("name"))  # type: ignore[arg-type]
    if cls is None:
        return  # build_method names the unknown method
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in values and not _type_matches(values[field.name], hints.get(field.name, Any)):
            raise bad_value(f"method.{field.name}", values[field.name], _describe(hints[field.name]))


def check_trainer_config(trainer: Any) -> None:
    """The trainer options peftbench depends on, and strategies this machine cannot run."""
    import torch

    from peftbench.checkpointing import strategy_name

    given = trainer.get("strategy", "auto")
    strategy = strategy_name(given)
    shown = given if isinstance(given, str) else str(given.get("_target_", strategy)).rsplit(".", 1)[-1]
    if strategy.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            f"trainer.strategy={shown!r} needs DeepSpeed, which is not installed; accepted: "
            "pip install deepspeed (CUDA), or trainer=ddp"
        )
    if strategy.startswith("fsdp") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.strategy={shown!r} needs CUDA GPUs (Lightning's FSDP); accepted on this "
            "machine: trainer=ddp (CPU processes, gloo)"
        )
    if trainer.get("use_distributed_sampler", False) is not False:
        raise bad_value(
            "trainer.use_distributed_sampler",
            trainer.get("use_distributed_sampler"),
            "false (peftbench shards the training data itself, see peftbench/tasks/sampler.py)",
        )
    steps = trainer.get("max_steps", -1)
    if not is_int(steps) or not (steps == -1 or steps >= 1):
        raise bad_value("trainer.max_steps", steps, "an integer >= 1 (optimizer steps), or -1 (max_epochs)")
    accumulate = trainer.get("accumulate_grad_batches", 1)
    check_int("trainer.accumulate_grad_batches", accumulate)
    nodes = trainer.get("num_nodes", 1)
    check_int("trainer.num_nodes", nodes)
    deterministic = trainer.get("deterministic", False)
    if deterministic not in (True, False, "warn", None):
        raise bad_value("trainer.deterministic", deterministic, "true, false, warn")
    if not isinstance(trainer.get("compile", False), bool):
        raise bad_value("trainer.compile", trainer.get("compile"), "true, false")


def task_config(task: Any) -> Any:
    """The `task` section for `build_task`, without `group_by_length`: that one is a batching option every
    task accepts, applied by the run to the task's training loader (peftbench/tasks/sampler.py)."""
    values = OmegaConf.to_container(task, resolve=True) if isinstance(task, DictConfig) else task
    if not isinstance(values, dict):
        return values  # build_task names what is wrong with it
    values = dict(values)
    group = values.pop("group_by_length", False)
    if not isinstance(group, bool):
        raise bad_value("task.group_by_length", group, "true, false")
    return values


def validate_config(cfg: DictConfig) -> tuple[Any, Any]:
    """Every check of the input that needs neither the model nor the data: a one-line ConfigError naming
    the bad key, before anything is loaded. Returns the built `(method, task)`."""
    from peftbench.methods import build_method
    from peftbench.optim import check_optim_config
    from peftbench.resume import check_checkpoint_config
    from peftbench.tasks import build_task

    method_values = OmegaConf.to_container(cfg.method, resolve=True)
    check_method_types(method_values)  # type: ignore[arg-type]
    method = build_method(method_values)  # type: ignore[arg-type]
    _check_optim_types(cfg.optim)
    check_optim_config(cfg.optim)
    batch_size = cfg.batch_size
    check_int("batch_size", batch_size)
    check_int("seed", cfg.seed, minimum=0)
    task = build_task(task_config(cfg.task))
    check_trainer_config(cfg.trainer)
    check_stepping_task(task, cfg.trainer)
    check_checkpoint_config(cfg)
    return method, task


def check_stepping_task(task: Any, trainer: Any) -> None:
    """A task that steps the optimizer itself (peftbench/tasks/stepping.py) takes one optimizer step per
    update it makes: gradient accumulation over batches does not apply (Lightning refuses it too)."""
    from peftbench.tasks.stepping import steps_optimizer_itself

    if not steps_optimizer_itself(task):
        return
    accumulate = trainer.get("accumulate_grad_batches", 1)
    if accumulate != 1:
        raise bad_value(
            "trainer.accumulate_grad_batches",
            accumulate,
            f"1 for task {task.name!r} (it steps the optimizer itself; use its minibatches instead)",
        )
    per_batch = int(getattr(task, "optimizer_steps_per_batch", 1))
    steps = trainer.get("max_steps", -1)
    if steps != -1 and steps % per_batch:
        raise bad_value(
            "trainer.max_steps",
            steps,
            f"a multiple of {per_batch} (task {task.name!r} takes {per_batch} optimizer steps per batch)",
        )


def load_config(overrides: Sequence[str], conf_dir: Path | None = None) -> DictConfig:
    """Compose `conf/config.yaml` with `overrides` (Hydra's compose API); Hydra's composition errors (an
    unknown key, a malformed override) become a one-line ConfigError naming the key."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from peftbench.cli_checks import CONF_DIR, check_group_overrides

    conf_dir = conf_dir or CONF_DIR
    check_group_overrides(list(overrides), conf_dir)
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        raise ConfigError(composition_error(err, overrides)) from None


def composition_error(err: BaseException, overrides: Sequence[str]) -> str:
    """One line for a Hydra composition error, naming the key or the override at fault."""
    import re

    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    text = str(err).strip()
    first = (text.splitlines() or [type(err).__name__])[0]
    unknown = re.search(r"Could not override '([^']+)'", text)
    if unknown and "not in struct" in str(err.__cause__ or ""):
        key = unknown.group(1)
        return f"{key} is not a key of this config; accepted: a key shown by --cfg job (+{key}=... adds one)"
    if isinstance(err, OverrideParseException):
        parser = OverridesParser.create()
        for override in overrides:
            try:
                parser.parse_overrides([override])
            except OverrideParseException as bad:
                detail = [line for line in str(bad).splitlines() if not line.startswith(("See ", "Error "))]
                return f"override {override!r} is not valid ({'; '.join(detail) or first})"
    if first.startswith("Ambiguous value"):
        return f"{first}: a sweep needs -m (or write a list as key=[a,b])"
    return f"{first} ({type(err).__name__})"


def processes(trainer: Any) -> int:
    """Training processes the trainer config asks for: devices (an int, a list, or 1 for `auto`) x nodes."""
    devices = trainer.get("devices", 1)
    per_node = len(devices) if isinstance(devices, Sequence) and not isinstance(devices, str) else devices
    if not is_int(per_node) or per_node < 1:
        per_node = 1
    return per_node * int(trainer.get("num_nodes", 1) or 1)
