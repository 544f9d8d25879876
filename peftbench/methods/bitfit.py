"""BitFit: only the bias terms train (Ben Zaken et al. 2021, arXiv 2106.10199).

Sec. 3.1: every bias of the network trains (attention q/k/v/output, MLP, and LayerNorm biases), the rest is
frozen. A bias is found structurally: the parameter a module registers as its own ``bias``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from torch import nn

from peftbench.errors import ConfigError
from peftbench.methods.full import BaseWeightsMethod, unique_parameters
from peftbench.methods.registry import register


def bias_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Every module's own ``bias`` parameter (nn.Linear, LayerNorm, Conv1D, ...), a shared one once."""
    named = (
        (f"{name}.bias" if name else "bias", module._parameters["bias"])
        for name, module in model.named_modules()
        if isinstance(module._parameters.get("bias"), nn.Parameter)
    )
    return unique_parameters(named)


@register
@dataclasses.dataclass
class BitFit(BaseWeightsMethod):
    """Only bias parameters train."""

    name: ClassVar[str] = "bitfit"

    def trainable_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        found = bias_parameters(model)
        if not found:
            raise ConfigError(
                "method='bitfit': model has no bias parameters; BitFit has nothing to train "
                "(Llama-family models have none: use a model with biases, or another method)"
            )
        return found
