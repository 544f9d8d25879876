"""The reference policy of an objective that compares against the untuned model (RL from feedback's KL).

`run.py`'s build hands every task `use_reference(factory)`, a context factory that runs the model with the
method's adapters disabled (`PeftMethod.disabled`: no second copy of the weights). A method that changes the
base weights in place (full, partial, BitFit, LN tuning, Delta-LoRA) refuses with a ConfigError; the
reference is then a frozen deep copy of the model taken at `use_reference` time, before any training step.
This is the rule docs/METHODS.md states for DPO and RL alike ("Reinforcement learning from feedback").
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator

import torch

from peftbench.errors import ConfigError

log = logging.getLogger(__name__)

ReferenceFactory = Callable[[], contextlib.AbstractContextManager[torch.nn.Module]]


class ReferencePolicy:
    """The reference model of one task: adapters disabled, or a frozen copy (`kind` says which)."""

    def __init__(self, task_name: str) -> None:
        self.task_name = task_name
        self.kind = "unset"
        self._model: torch.nn.Module | None = None
        self._factory: ReferenceFactory | None = None
        self._frozen: torch.nn.Module | None = None

    def remember(self, model: torch.nn.Module) -> None:
        """The policy model (from the task's `head`), copied if the method cannot disable its adapters."""
        self._model = model

    def use(self, factory: ReferenceFactory) -> None:
        """Use `factory` if it can be entered; else keep a frozen deep copy of the model as it is now."""
        try:
            with factory():
                pass
        except ConfigError as error:
            if self._model is None:
                raise ConfigError(
                    f"task {self.task_name!r} needs a reference model and none is available ({error})"
                ) from None
            frozen = copy.deepcopy(self._model).eval()
            for param in frozen.parameters():
                param.requires_grad_(False)
            self._frozen, self.kind = frozen, "frozen_copy"
            self._factory = lambda: contextlib.nullcontext(frozen)
            log.info("%s: the method has no adapters to disable; reference = a frozen copy", self.task_name)
            return
        self._factory, self.kind = factory, "adapters_disabled"

    @contextlib.contextmanager
    def model(self, device: torch.device) -> Iterator[torch.nn.Module]:
        """The reference model, on `device` (a frozen copy follows the policy there)."""
        if self._factory is None:
            raise RuntimeError(f"{self.task_name}: call use_reference(factory) before using the reference")
        with self._factory() as model:
            if self._frozen is not None and next(self._frozen.parameters()).device != device:
                self._frozen.to(device)  # Lightning moved the policy, not this copy
            yield model
