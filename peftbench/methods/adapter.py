"""Bottleneck adapters (Houlsby et al. 2019, arXiv 1902.00751).

Sec. 2.1, Fig. 2: a small module is inserted twice per transformer block, on the output of the attention
sub-layer (after its output projection) and on the output of the feed-forward sub-layer, before each is added
to the residual stream: ``h <- h + W_up f(W_down h + b_down) + b_up``, with d -> m -> d for a bottleneck m.
Here the adapter wraps the sub-layer's last linear layer (Llama: ``o_proj`` and ``down_proj``), so h is that
layer's output. Per adapter ``2 m d + m + d`` parameters train (the paper's count, biases included).

Near-identity init (Sec. 2.1; docs/METHODS.md): ``W_up = 0`` and ``b_up = 0``, so the model starts exactly at
the base function; ``W_down`` takes nn.Linear's default init (as LoRA's A), ``b_down = 0``, so W_up gets a
gradient from the first step. f is GELU by default (the paper leaves it open). The paper also retrains the
layer norms; here only the adapters train (combine with `ln_tuning` for that). Not mergeable: f is not
linear.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from peftbench.errors import bad_value
from peftbench.methods.base import AdapterLayer, PeftMethod
from peftbench.methods.lora import adapter_dtype, compute_copy
from peftbench.methods.registry import register
from peftbench.methods.walker import find_targets, wrap_targets

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "tanh": torch.tanh,
}


class BottleneckAdapter(AdapterLayer):
    """``h + W_up f(W_down h + b_down) + b_up`` on the output h of the wrapped layer (Sec. 2.1)."""

    def __init__(self, base: nn.Module, bottleneck_size: int, activation: str) -> None:
        super().__init__()
        self.base = base
        self.activation = ACTIVATIONS[activation]
        width = base.out_features
        factory = {"dtype": adapter_dtype(base), "device": base.weight.device}
        self.down_weight = nn.Parameter(torch.empty(bottleneck_size, width, **factory))
        nn.init.kaiming_uniform_(self.down_weight, a=math.sqrt(5))
        self.down_bias = nn.Parameter(torch.zeros(bottleneck_size, **factory))
        self.up_weight = nn.Parameter(torch.zeros(width, bottleneck_size, **factory))
        self.up_bias = nn.Parameter(torch.zeros(width, **factory))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)
        if not self.adapter_enabled:
            return h
        down = F.linear(h, compute_copy(self.down_weight, h), compute_copy(self.down_bias, h))
        z = self.activation(down)
        return h + F.linear(z, compute_copy(self.up_weight, h), compute_copy(self.up_bias, h))


@register
@dataclasses.dataclass
class Adapter(PeftMethod):
    """Houlsby bottleneck adapters after the attention and the MLP of every block; only the adapters train."""

    name: ClassVar[str] = "adapter"
    size_knob: ClassVar[str | None] = "bottleneck_size"

    bottleneck_size: int = 64
    activation: str = "gelu"
    target_modules: str | list[str] = dataclasses.field(default_factory=lambda: ["o_proj", "down_proj"])

    def validate(self) -> None:
        size = self.bottleneck_size
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise bad_value("method.bottleneck_size", size, "an integer > 0 (the paper sweeps 8, 64, 256)")
        if not isinstance(self.activation, str) or self.activation not in ACTIVATIONS:
            raise bad_value("method.activation", self.activation, sorted(ACTIVATIONS))

    def attach(self, model: nn.Module) -> None:
        names = find_targets(model, self.target_modules)
        wrap_targets(
            model, names, lambda _name, layer: BottleneckAdapter(layer, self.bottleneck_size, self.activation)
        )
