"""(IA)3: infused adapter by inhibiting and amplifying inner activations (Liu et al. 2022, arXiv 2205.05638).

Sec. 3.3: three learned vectors rescale, element-wise, the attention keys and values and the intermediate
activation of the position-wise feed-forward network: ``softmax(Q (l_k ⊙ K)^T) (l_v ⊙ V)`` and
``(l_ff ⊙ γ(W1 x)) W2``. Here a vector belongs to one linear layer: for the key and value projections it
scales the layer's output (``y = l ⊙ base(x)``, bias included, as HF PEFT does), for a "feed-forward" layer
(the MLP's down projection) it scales the layer's input (``y = base(l ⊙ x)``). All vectors start at 1, so
the model starts at the base function. Mergeable: ``W <- diag(l) W`` (and ``b <- l ⊙ b``) for an output
scale, ``W <- W diag(l)`` for an input scale.

Defaults follow HF PEFT's for Llama-style models: ``k_proj``, ``v_proj`` and ``down_proj``, the last one
feed-forward.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from peftbench.errors import ConfigError, bad_value
from peftbench.methods.base import AdapterLayer, PeftMethod, adapter_layers
from peftbench.methods.dense import base_weight, plain_linear
from peftbench.methods.lora import adapter_dtype, compute_copy
from peftbench.methods.peft_format import exported, peft_key, peft_layer_config
from peftbench.methods.registry import register
from peftbench.methods.walker import find_targets, wrap_targets


class IA3Linear(AdapterLayer):
    """``y = l ⊙ base(x)`` (keys, values) or, for a feed-forward layer, ``y = base(l ⊙ x)`` (Sec. 3.3)."""

    def __init__(self, base: nn.Module, feedforward: bool) -> None:
        super().__init__()
        self.base = base
        self.feedforward = feedforward
        size = base.in_features if feedforward else base.out_features
        self.ia3_l = nn.Parameter(torch.ones(size, dtype=adapter_dtype(base), device=base.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.adapter_enabled:
            return self.base(x)
        if self.feedforward:
            return self.base(x * compute_copy(self.ia3_l, x))
        y = self.base(x)
        return y * compute_copy(self.ia3_l, y)

    def merged(self) -> nn.Linear:
        """The scaled weight (and bias, for an output scale) as a plain nn.Linear, in fp32 then rounded."""
        weight = base_weight(self.base)
        scale = self.ia3_l.detach().float()
        bias = self.base.bias
        if self.feedforward:
            return plain_linear((weight.float() * scale[None, :]).to(weight.dtype), bias)
        scaled_bias = None if bias is None else (bias.float() * scale).to(bias.dtype)
        return plain_linear((weight.float() * scale[:, None]).to(weight.dtype), scaled_bias)


def _module_selection(key: str, value: Any, *, empty: bool) -> None:
    """`value` is ``all-linear``, a regex, or a list of layer names (an empty one only where `empty`)."""
    ok = isinstance(value, str) or (
        isinstance(value, list) and all(isinstance(v, str) for v in value) and (empty or value)
    )
    if not ok:
        raise bad_value(
            f"method.{key}",
            value,
            "all-linear, a regex, or a list of layer names" + (" (may be [])" if empty else ""),
        )


@register
@dataclasses.dataclass
class IA3(PeftMethod):
    """(IA)3 on the selected linear layers; only the scaling vectors train."""

    name: ClassVar[str] = "ia3"
    mergeable: ClassVar[bool] = True
    peft_form: ClassVar[bool] = True

    target_modules: str | list[str] = dataclasses.field(
        default_factory=lambda: ["k_proj", "v_proj", "down_proj"]
    )
    feedforward_modules: str | list[str] = dataclasses.field(default_factory=lambda: ["down_proj"])

    def validate(self) -> None:
        _module_selection("target_modules", self.target_modules, empty=False)
        _module_selection("feedforward_modules", self.feedforward_modules, empty=True)

    def resolve(self, model: nn.Module) -> tuple[list[str], set[str]]:
        """The adapted layers, and those of them that scale their input (feed-forward)."""
        targets = find_targets(model, self.target_modules)
        feedforward = (
            set(find_targets(model, self.feedforward_modules)) if self.feedforward_modules else set()
        )
        outside = sorted(feedforward - set(targets))
        if outside:
            raise ConfigError(
                f"method.feedforward_modules={self.feedforward_modules!r} selects {outside[:3]}, which "
                f"method.target_modules={self.target_modules!r} does not adapt; "
                "accepted: a subset of the targets"
            )
        return targets, feedforward

    def attach(self, model: nn.Module) -> None:
        targets, feedforward = self.resolve(model)
        wrap_targets(model, targets, lambda name, layer: IA3Linear(layer, name in feedforward))

    def peft_export(self, model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """PEFT's IA3 adapter: per layer ``ia3_l``, shaped (out, 1) for an output scale and (1, in) for a
        feed-forward (input) scale."""
        layers = {n: m for n, m in adapter_layers(model) if isinstance(m, IA3Linear)}
        config = peft_layer_config(model, "IA3", layers) | {
            "feedforward_modules": sorted(n for n, m in layers.items() if m.feedforward),
            "init_ia3_weights": True,
        }
        tensors = {
            peft_key(name, "ia3_l"): exported(
                layer.ia3_l[None, :] if layer.feedforward else layer.ia3_l[:, None]
            )
            for name, layer in layers.items()
        }
        return config, tensors
