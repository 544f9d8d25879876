"""LN tuning: only the normalisation layers' weights and biases train (docs/METHODS.md, "Baselines")."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from torch import nn

from peftbench.methods.registry import register
from peftbench.methods.selection import SelectionMethod, owned_parameters

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


def norm_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters (weight, bias, ...) held directly by every normalisation layer of the model."""
    return owned_parameters(
        model,
        lambda module: [n for n, _ in module.named_parameters(recurse=False)] if is_norm(module) else [],
    )


@register
@dataclasses.dataclass
class LNTuning(SelectionMethod):
    """Only the parameters of normalisation layers (LayerNorm, RMSNorm-like) train."""

    name: ClassVar[str] = "ln_tuning"
    nothing_to_train: ClassVar[str] = (
        "model has no normalisation layer with parameters; LN tuning has nothing to train"
    )

    def select(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return norm_parameters(model)
