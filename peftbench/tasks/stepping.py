"""What a task that steps the optimizer itself gets from the training loop.

Most tasks give a loss per batch and Lightning steps the optimizer once (automatic optimization). A task
whose batch needs work before the loss and several optimizer steps per batch (RL from feedback: rollouts,
then epochs of minibatch updates, `peftbench.tasks.reinforce`) declares `manual_optimization = True` and a
`training_step(context, batch)`. The LightningModule (`peftbench/module.py`) then hands it a `StepContext`
for each batch; `context.optimizer_step(loss)` does everything one real optimizer step needs, as the
automatic path does it: backward, gradient clipping (`trainer.gradient_clip_val`), the optimizer step, the
learning-rate scheduler's step and the method's `after_optimizer_step` with the count of steps done.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass
class StepContext:
    """One training batch's view of the loop, for a task that steps the optimizer itself.

    Attributes:
        model: the policy (the model with the method applied), on the training device.
        steps_done: real optimizer steps done before this batch (the same on a resumed run: it seeds the
            batch's sampling, so a resumed run draws the same samples).
        rank, world_size: this process among the data-parallel ones.
        optimizer_step: backward of the loss, clip, step, schedule, `method.after_optimizer_step`.
        log: log a batch's statistics (`train/<key>`) and keep them in the run's record.
    """

    model: torch.nn.Module
    steps_done: int
    rank: int
    world_size: int
    optimizer_step: Callable[[torch.Tensor], None]
    log: Callable[[Mapping[str, float]], None]


@runtime_checkable
class SteppingTask(Protocol):
    """A task with `manual_optimization = True`: its `training_step` steps the optimizer through the
    context (any number of times) and returns the batch's mean loss (detached) and the tokens it ran."""

    manual_optimization: bool

    def training_step(self, context: StepContext, batch: dict[str, Any]) -> tuple[torch.Tensor, int]: ...


def steps_optimizer_itself(task: Any) -> bool:
    """Whether `task` steps the optimizer itself (`manual_optimization = True`)."""
    return bool(getattr(task, "manual_optimization", False))
