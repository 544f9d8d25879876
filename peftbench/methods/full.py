"""Full fine-tuning: every parameter of the model trains (docs/METHODS.md, "Baselines").

The quality ceiling and the efficiency floor. Also home of `BaseWeightsMethod`, the common base of the
baselines that train a structural selection of the base model's own parameters (full, partial, BitFit,
LN tuning) instead of inserting adapter layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import nn

from peftbench.errors import ConfigError
from peftbench.methods.base import PeftMethod
from peftbench.methods.registry import register


def unique_parameters(named: Iterable[tuple[str, nn.Parameter]]) -> list[tuple[str, nn.Parameter]]:
    """Drop repeats of the same tensor (tied weights count and train once), keeping the first name."""
    seen: set[int] = set()
    found: list[tuple[str, nn.Parameter]] = []
    for name, param in named:
        if id(param) not in seen:
            seen.add(id(param))
            found.append((name, param))
    return found


@dataclasses.dataclass
class BaseWeightsMethod(PeftMethod):
    """A baseline that trains some of the base model's own parameters (found structurally).

    Nothing is inserted, so there is no adapter to fold in or to switch off: the trained tensors *are*
    base weights (`modifies_base`), saved by `adapter_state_dict` as the tensors that train.
    """

    modifies_base: ClassVar[bool] = True
    mergeable: ClassVar[bool] = False
    identity_at_init: ClassVar[bool] = True
    inserts_layers: ClassVar[bool] = False


@register
@dataclasses.dataclass
class Full(BaseWeightsMethod):
    """Every (floating-point) parameter of the model trains; tied weights train once."""

    name: ClassVar[str] = "full"

    def attach(self, model: nn.Module) -> None:
        packed = [n for n, p in model.named_parameters() if not p.is_floating_point()]
        if packed:
            raise ConfigError(
                f"method='full' needs a full-precision model; parameters {packed[:3]} are quantized "
                "(use qlora for a 4-bit base)"
            )

    def trainable_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return unique_parameters(model.named_parameters())

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The full state: every parameter (a tied tensor once) and every persistent buffer."""
        state: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for name, tensor in model.state_dict(keep_vars=True).items():
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            state[name] = tensor.detach().cpu().contiguous()
        state.update(self.extra_state(model))
        return state
