"""BitFit: only the bias terms train (Ben Zaken et al. 2021, arXiv 2106.10199).

Sec. 3.1: every bias of the network trains (attention q/k/v/output, MLP, and LayerNorm biases), the rest is
frozen. A bias is found structurally: the parameter a module registers as its own ``bias``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from torch import nn

from peftbench.methods.registry import register
from peftbench.methods.selection import SelectionMethod, owned_parameters


def bias_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Every module's own ``bias`` parameter (nn.Linear, LayerNorm, Conv1D, ...), a shared one once."""
    return owned_parameters(
        model, lambda module: ["bias"] if isinstance(module._parameters.get("bias"), nn.Parameter) else []
    )


@register
@dataclasses.dataclass
class BitFit(SelectionMethod):
    """Only bias parameters train."""

    name: ClassVar[str] = "bitfit"
    nothing_to_train: ClassVar[str] = (
        "model has no bias parameters; BitFit has nothing to train "
        "(Llama-family models have none: use a model with biases, or another method)"
    )

    def select(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return bias_parameters(model)
