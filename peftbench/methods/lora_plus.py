"""LoRA+: LoRA with a larger learning rate for B than for A (Hayou et al. 2024, arXiv 2402.12354).

Sec. 3: with the same width-independent init as LoRA, efficient feature
learning needs ``lr_B = ratio * lr_A`` with ratio >> 1; the paper recommends ratio = 2^4 = 16. Forward and
init are LoRA's (`LoRALinear`); only the optimizer groups differ, following the reference implementation
(github.com/nikhil-ghosh-berkeley/loraplus): group A at ``lr`` holds the LoRA A matrices and every other
trainable parameter of 2+ dimensions (e.g. a classifier head); group B at ``lr * ratio`` holds the LoRA B
matrices and every trainable 1-D parameter. The reference's third group (LoRA on embeddings at 1e-6) does
not arise: peftbench adapts linear layers only. The user's weight decay is applied in every group (the
reference and HF PEFT's helper put 0 in every group unless told otherwise). Export: a PEFT LORA adapter
(`LoRA.peft_export`): the learning rates are a training matter only.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

from torch import nn

from peftbench.errors import bad_value
from peftbench.methods.base import adapter_layers
from peftbench.methods.lora import LoRA, LoRALinear
from peftbench.methods.registry import register


@register
@dataclasses.dataclass
class LoRAPlus(LoRA):
    """LoRA whose B matrices (and 1-D trainable parameters) learn ``lr_ratio`` times faster."""

    name: ClassVar[str] = "lora_plus"

    lr_ratio: float = 16.0

    def validate(self) -> None:
        super().validate()
        ratio = self.lr_ratio
        if (
            isinstance(ratio, bool)
            or not isinstance(ratio, int | float)
            or not math.isfinite(ratio)
            or ratio <= 0
        ):
            raise bad_value("method.lr_ratio", ratio, "a finite number > 0 (paper: 16)")

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Group A (lr): LoRA A and other 2-D+ weights; group B (lr * lr_ratio): LoRA B and 1-D params."""
        lora_a, lora_b = set(), set()
        for _, layer in adapter_layers(model):
            if isinstance(layer, LoRALinear):
                lora_a.add(id(layer.lora_A))
                lora_b.add(id(layer.lora_B))
        group_a: list[nn.Parameter] = []
        group_b: list[nn.Parameter] = []
        for param in model.parameters():
            if not param.requires_grad:
                continue
            if id(param) in lora_b or (id(param) not in lora_a and param.ndim == 1):
                group_b.append(param)
            else:
                group_a.append(param)
        groups = [
            {"params": group_a, "lr": lr, "weight_decay": weight_decay, "name": "lora_plus_A"},
            {
                "params": group_b,
                "lr": lr * self.lr_ratio,
                "weight_decay": weight_decay,
                "name": "lora_plus_B",
            },
        ]
        return [g for g in groups if g["params"]]
