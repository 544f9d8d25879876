"""Baselines that train a structural selection of the base model's own parameters (BitFit, LN tuning).

A selection method names what it trains with one function of the model; a model where that selection is empty
is refused with the method's own one-line reason instead of training nothing (docs/METHODS.md, "Baselines").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import ClassVar

from torch import nn

from peftbench.errors import ConfigError
from peftbench.methods.full import BaseWeightsMethod, unique_parameters


def owned_parameters(
    model: nn.Module, select: Callable[[nn.Module], Iterable[str]]
) -> list[tuple[str, nn.Parameter]]:
    """The parameters each module holds directly under the local names `select(module)` returns, with
    qualified names; a tensor shared by several modules (tied weights) once."""
    named = (
        (f"{name}.{local}" if name else local, module._parameters[local])
        for name, module in model.named_modules()
        for local in select(module)
    )
    return unique_parameters(named)


@dataclasses.dataclass
class SelectionMethod(BaseWeightsMethod):
    """Trains `select(model)`; an empty selection is a ConfigError: ``method=<name>: <nothing_to_train>``."""

    #: why the model has nothing to train, and what to do instead (one line)
    nothing_to_train: ClassVar[str] = "found nothing to train"

    def select(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        raise NotImplementedError

    def trainable_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        found = self.select(model)
        if not found:
            raise ConfigError(f"method={self.name!r}: {self.nothing_to_train}")
        return found
