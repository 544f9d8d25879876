"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv 2402.09353).

Sec. 4.1, Eq. (5): ``W' = m ⊙ (W0 + s B A) / ||W0 + s B A||_c`` where ``||.||_c`` is the L2 norm of each
output row (the paper's column norm, for a weight stored as (in, out)). The magnitude m (out,) starts at
``||W0||_c`` and A, B have LoRA's init (B = 0), so ``W' = W0`` at init. Sec. 4.3: the norm is treated as a
constant, detached from the graph (gradients reach m, A and B only through the numerator).

With ``g = m / ||W0 + s B A||_c`` (detached) and ``x' = dropout(x)`` the layer computes
    ``y = base(x) + (g - 1) ⊙ (W0 x') + g ⊙ s B A x'``,
which is ``W' x + bias`` when dropout is off (eval, or p = 0). In training with dropout the dropped input
feeds the whole DoRA term, as in the authors' code and HF PEFT. Without dropout ``W0 x`` is
``base(x) - bias``, so it is not computed twice. The norm is taken in fp32.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from peftbench.methods.base import AdapterLayer, adapter_layers
from peftbench.methods.dense import base_weight
from peftbench.methods.lora import LoRA, LoRALinear, compute_copy
from peftbench.methods.peft_format import exported, peft_key, peft_lora_config
from peftbench.methods.registry import register


class DoRALinear(LoRALinear):
    """LoRA plus a trainable magnitude per output row; the direction is ``W0 + s B A``, row-normalised."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float, rslora: bool) -> None:
        super().__init__(base, r, alpha, dropout, rslora)
        with torch.no_grad():
            norm = torch.linalg.norm(base_weight(base).float(), dim=1)
        self.magnitude = nn.Parameter(norm.to(self.lora_A.dtype))

    @torch.no_grad()
    def direction(self) -> torch.Tensor:
        """``W0 + s B A`` in fp32, outside the graph."""
        return base_weight(self.base).float() + self.delta_weight().float()

    def scale(self, direction: torch.Tensor) -> torch.Tensor:
        """``g = m / ||direction||_c`` in fp32; the norm is a constant for autograd (Sec. 4.3)."""
        # a zero row gives g = m / tiny instead of 0 / 0 = nan
        norm = torch.linalg.norm(direction.detach(), dim=1).clamp_min(torch.finfo(torch.float32).tiny)
        return self.magnitude.float() / norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.adapter_enabled:
            return y
        dtype = x.dtype  # compute dtype; A, B and m are fp32 masters (cast here, gradients flow back)
        g = self.scale(self.direction()).to(dtype)
        if isinstance(self.dropout, nn.Dropout) and self.dropout.training:
            dropped = self.dropout(x)
            base_out = F.linear(dropped.to(dtype), base_weight(self.base).to(dtype))
        else:  # no dropout: W0 x is the base output without its bias
            dropped, bias = x, self.base.bias
            base_out = (y if bias is None else y - bias).to(dtype)
        lora_a, lora_b = compute_copy(self.lora_A, dropped), compute_copy(self.lora_B, dropped)
        branch = F.linear(F.linear(dropped, lora_a), lora_b) * self.scaling
        return y + ((g - 1) * base_out + g * branch).to(y.dtype)

    def merged(self) -> nn.Linear:
        """``W' = m ⊙ (W0 + s B A) / ||W0 + s B A||_c`` as a plain nn.Linear (the bias is unchanged)."""
        layer = super().merged()
        with torch.no_grad():
            direction = self.direction()
            layer.weight.copy_(self.scale(direction)[:, None] * direction)
        return layer


@register
@dataclasses.dataclass
class DoRA(LoRA):
    """DoRA on the selected linear layers: A, B and the magnitude m train (hyper-parameters as LoRA's)."""

    name: ClassVar[str] = "dora"

    def make_layer(self, base: nn.Module) -> AdapterLayer:
        return DoRALinear(base, self.r, self.alpha, self.dropout, self.rslora)

    def peft_export(self, model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """PEFT's LoRA adapter with ``use_dora: true``: per layer ``lora_A.weight``, ``lora_B.weight`` and
        ``lora_magnitude_vector`` (m)."""
        layers = {n: m for n, m in adapter_layers(model) if isinstance(m, DoRALinear)}
        config = peft_lora_config(
            model, layers, r=self.r, alpha=self.alpha, dropout=self.dropout, rslora=self.rslora, use_dora=True
        )
        tensors: dict[str, torch.Tensor] = {}
        for name, layer in layers.items():
            tensors[peft_key(name, "lora_A.weight")] = exported(layer.lora_A)
            tensors[peft_key(name, "lora_B.weight")] = exported(layer.lora_B)
            tensors[peft_key(name, "lora_magnitude_vector")] = exported(layer.magnitude)
        return config, tensors
