"""LN tuning: only the normalisation layers' weights and biases train (docs/METHODS.md, "Baselines")."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from torch import nn

from peftbench.errors import ConfigError
from peftbench.methods.full import BaseWeightsMethod, unique_parameters
from peftbench.methods.registry import register

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.RMSNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.batchnorm._NormBase,  # BatchNorm*d, InstanceNorm*d
)


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer: torch's norm classes, or a class named like one (LlamaRMSNorm, T5LayerNorm,
    Qwen2RMSNorm, ...: model code defines its own RMSNorm classes rather than subclassing torch's)."""
    return isinstance(module, _NORM_TYPES) or type(module).__name__.endswith(("Norm", "LayerNorm", "RMSNorm"))


def norm_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, module) for name, module in model.named_modules() if is_norm(module)]


def norm_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters (weight, bias, ...) held directly by every normalisation layer of the model."""
    named = (
        (f"{name}.{local}" if name else local, param)
        for name, module in norm_modules(model)
        for local, param in module.named_parameters(recurse=False)
    )
    return unique_parameters(named)


@register
@dataclasses.dataclass
class LNTuning(BaseWeightsMethod):
    """Only the parameters of normalisation layers (LayerNorm, RMSNorm-like) train."""

    name: ClassVar[str] = "ln_tuning"

    def trainable_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        found = norm_parameters(model)
        if not found:
            raise ConfigError(
                "method='ln_tuning': model has no normalisation layer with parameters; "
                "LN tuning has nothing to train"
            )
        return found
