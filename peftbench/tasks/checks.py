"""The checks a task makes of its config and of the model it is given: one-line ConfigErrors naming
`task.<key>` (or the model kind it needs), before anything trains."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from peftbench.errors import ConfigError, check_int, is_number
from peftbench.tasks.heads import is_causal_lm


def positive_int(name: str, value: Any) -> int:
    """`value` if it is an int >= 1, else a one-line ConfigError naming `task.<name>`."""
    return check_int(f"task.{name}", value)


def positive_float(name: str, value: Any) -> float:
    """`value` as a float if it is a number > 0, else a one-line ConfigError."""
    if not is_number(value) or not value > 0:  # type: ignore[operator]
        raise ConfigError(f"task.{name}={value!r} is not valid; accepted: a number > 0")
    return float(value)


def check_template(prompt: Any, required: str, fields: Sequence[str]) -> str:
    """`prompt` if it is a format string holding `{required}` whose fields are among `fields`, else a
    one-line ConfigError naming `task.prompt`."""
    if not isinstance(prompt, str) or f"{{{required}}}" not in prompt:
        raise ConfigError(
            f"task.prompt={prompt!r} is not valid; accepted: a template containing {{{required}}}"
        )
    try:
        prompt.format(**dict.fromkeys(fields, ""))
    except (KeyError, IndexError, ValueError) as error:
        named = " and ".join(f"{{{f}}}" for f in fields)
        raise ConfigError(
            f"task.prompt={prompt!r} is not valid ({error!r}); accepted: a template whose fields are {named} "
            "(write literal braces as {{ }})"
        ) from None
    return prompt


def check_enough_training_data(task_name: str, train_examples: int, batch_size: int, processes: int) -> None:
    """A one-line ConfigError when the training split cannot fill one global batch (before training)."""
    need = batch_size * processes
    if train_examples < need:
        per = f" ({batch_size} per process x {processes} processes)" if processes > 1 else ""
        raise ConfigError(
            f"task {task_name!r} has {train_examples} training examples, fewer than one batch of "
            f"batch_size={batch_size}{per}; accepted: at least {need} training examples (lower batch_size, "
            "shrink task.split.val/test or raise task.split.max_train, or add data)"
        )


def require_causal_lm(model: torch.nn.Module, task: str) -> None:
    """ConfigError unless `model` is a causal LM (an encoder or sequence-classification model is not)."""
    if not is_causal_lm(model):
        raise ConfigError(
            f"task={task!r} needs a causal language model (model.architecture=causal_lm); "
            f"{type(model).__name__} has no language-model head"
        )


def require_eos(tokenizer: Any, task: str) -> None:
    """ConfigError unless the tokenizer has an EOS token (causal-LM tokenizers do; encoder ones do not)."""
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise ConfigError(
            f"task={task!r} needs a causal language model (model.architecture=causal_lm) whose tokenizer "
            f"has an EOS token; {type(tokenizer).__name__} has none (an encoder's tokenizer?)"
        )
