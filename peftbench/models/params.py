"""True parameter counts and storage bytes, including bitsandbytes-quantized weights.

A bitsandbytes 4-bit weight (`bnb.nn.Params4bit`) is stored packed, two values per uint8, so its `numel()`
is half the real count; its `quant_state.shape` holds the real shape. bitsandbytes is never imported here:
the packed weights are recognised by their attributes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch


def true_numel(param: torch.Tensor) -> int:
    """Number of model parameters `param` stands for (unpacks 4-bit packed bitsandbytes weights)."""
    quant_state = getattr(param, "quant_state", None)
    shape = getattr(quant_state, "shape", None)
    if shape is not None:
        return math.prod(shape)
    if type(param).__name__ == "Params4bit" and param.dtype == torch.uint8:
        return param.numel() * 2  # packed, but no quant state to read the shape from
    return param.numel()


def count_parameters(module: torch.nn.Module, trainable_only: bool = False) -> int:
    """Parameters of `module` (tied weights counted once), 4-bit packed weights counted unpacked.

    With `trainable_only`, only those with `requires_grad`.
    """
    return sum(true_numel(p) for p in module.parameters() if p.requires_grad or not trainable_only)


def parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes actually stored for the parameters and buffers of `module` (each tensor once), including the
    quantization statistics (absmax, codebooks, scales) of bitsandbytes-quantized weights."""
    seen: set[int] = set()
    total = 0
    for tensor in _stored_tensors(module):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def _stored_tensors(module: torch.nn.Module) -> Iterator[torch.Tensor]:
    for param in module.parameters():
        yield param
        yield from _quant_tensors(getattr(param, "quant_state", None))
        scales = getattr(param, "SCB", None)  # bitsandbytes Int8Params row scales
        if isinstance(scales, torch.Tensor):
            yield scales
    yield from module.buffers()


def _quant_tensors(quant_state: object) -> Iterator[torch.Tensor]:
    """The tensors of a bitsandbytes QuantState (and its nested state for double quantization)."""
    if quant_state is None:
        return
    for name in ("absmax", "code", "offset"):
        value = getattr(quant_state, name, None)
        if isinstance(value, torch.Tensor):
            yield value
    yield from _quant_tensors(getattr(quant_state, "state2", None))


def parameter_report(model: torch.nn.Module, base_total: int | None = None) -> dict[str, Any]:
    """True counts (4-bit packed weights unpacked): total, trainable (carry optimizer state), weight bytes;
    `trainable_percent` of `base_total` (the model before the method was applied; default: its total)."""
    total = count_parameters(model)
    trainable = count_parameters(model, trainable_only=True)
    reference = base_total or total
    return {
        "total": total,
        "trainable": trainable,
        "trainable_percent": 100.0 * trainable / reference,
        "weight_bytes": parameter_bytes(model),
    }
