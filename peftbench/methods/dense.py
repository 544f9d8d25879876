"""Dense weights of (possibly 4-bit) linear layers, and plain nn.Linear copies: what merging needs."""

from __future__ import annotations

import torch
from torch import nn


def base_weight(layer: nn.Module) -> torch.Tensor:
    """The dense weight of a (possibly 4-bit quantized) linear layer, in its compute dtype."""
    weight = layer.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, quant_state)
    return weight


def plain_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A frozen nn.Linear holding copies of `weight` (out, in) and `bias`, in their dtype and device."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    layer = layer.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer.requires_grad_(False)


def merged_with_delta(base: nn.Module, delta: torch.Tensor) -> nn.Linear:
    """``W0 + delta`` (summed in fp32, rounded to W0's dtype) with the base bias, as a plain nn.Linear."""
    weight = base_weight(base)
    return plain_linear((weight.float() + delta.float()).to(weight.dtype), base.bias)
