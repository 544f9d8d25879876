"""LoRA+: LoRA with a larger learning rate for B than for A (Hayou et al. 2024, arXiv 2402.12354).

Sec. 3: with the same width-independent init as LoRA, efficient feature
learning needs ``lr_B = ratio * lr_A`` with ratio >> 1; the paper recommends ratio = 2^4 = 16. Forward and
init are LoRA's (`LoRALinear`); only the optimizer groups differ, following the reference implementation
(github.com/nikhil-ghosh-berkeley/loraplus) and HF PEFT's `create_loraplus_optimizer`: group A at ``lr``
holds the LoRA A matrices and every other trainable parameter of 2+ dimensions (e.g. a classifier head);
group B at ``lr * ratio`` holds the LoRA B matrices and every trainable 1-D parameter. The reference's third
group (LoRA on embeddings at 1e-6) does not arise: peftbench adapts linear layers only.

Weight decay, as PEFT's helper groups it: biases (a parameter whose name says ``bias``) and the parameters of
normalisation layers get none; every other parameter gets the user's weight decay (PEFT's helper drops the
user's value unless it is passed as ``loraplus_weight_decay``: not copied). One deliberate difference:
PEFT recognises normalisation layers by transformers' ``ALL_LAYERNORM_LAYERS``, i.e. ``nn.LayerNorm`` only,
so it decays the RMSNorm weights of Llama-style models; here every normalisation layer is exempt (torch's
norm layers and any class named ``*Norm``, e.g. ``LlamaRMSNorm``), as transformers' own Trainer does
(`get_decay_parameter_names`). On models with ``nn.LayerNorm`` the groups are PEFT's exactly
(tests/test_lora_plus.py). Export: a PEFT LORA adapter (`LoRA.peft_export`): the learning rates are a
training matter only.
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
        """Group A (lr): LoRA A and other 2-D+ weights; group B (lr * lr_ratio): LoRA B and 1-D params; each
        split into the user's weight decay and none (biases, normalisation layers; see the module doc)."""
        lora_a, lora_b = set(), set()
        for _, layer in adapter_layers(model):
            if isinstance(layer, LoRALinear):
                lora_a.add(id(layer.lora_A))
                lora_b.add(id(layer.lora_B))
        exempt = no_decay_parameters(model)
        groups: dict[tuple[str, bool], list[nn.Parameter]] = {
            (kind, decay): [] for kind in ("A", "B") for decay in (True, False)
        }
        for param in model.parameters():
            if not param.requires_grad:
                continue
            kind = "B" if id(param) in lora_b or (id(param) not in lora_a and param.ndim == 1) else "A"
            groups[kind, id(param) not in exempt].append(param)
        rates = {"A": lr, "B": lr * self.lr_ratio}
        return [
            {
                "params": params,
                "lr": rates[kind],
                "weight_decay": weight_decay if decay else 0.0,
                "name": f"lora_plus_{kind}" + ("" if decay else "_no_decay"),
            }
            for (kind, decay), params in groups.items()
            if params
        ]


#: torch's normalisation layers (any class whose name ends in "Norm" counts too: LlamaRMSNorm, T5LayerNorm)
NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.LocalResponseNorm,
    nn.modules.batchnorm._NormBase,
)


def is_normalisation(module: nn.Module) -> bool:
    return isinstance(module, NORM_LAYERS) or type(module).__name__.endswith("Norm")


def no_decay_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters weight decay does not apply to: biases (``bias`` in the parameter's own name, as
    PEFT's `create_loraplus_optimizer` tests it) and the parameters of normalisation layers."""
    exempt: set[int] = set()
    for module in model.modules():
        norm = is_normalisation(module)
        for name, param in module.named_parameters(recurse=False):
            if norm or "bias" in name:
                exempt.add(id(param))
    return exempt
