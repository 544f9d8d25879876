"""LoRA: low-rank adaptation of a frozen linear layer (Hu et al. 2021, arXiv 2106.09685).

Sec. 4.1: ``h = W0 x + (alpha / r) * B A x`` with A (r, in) random and B (out, r) zero, so training starts
from the base model exactly. rsLoRA (Kalajdzievski 2023, arXiv 2312.03732) scales by ``alpha / sqrt(r)``.
Dropout acts on the adapter branch only (as in the reference implementation, loralib).

Export (`peft_export`): HF PEFT's LORA adapter, ``lora_A.weight`` (r, in) and ``lora_B.weight`` (out, r) per
layer, ``use_rslora`` for rsLoRA; LoRA+, LoRA-FA and QLoRA inherit it (their adapters are plain LoRA).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from peftbench.errors import ConfigError, bad_value
from peftbench.methods.base import AdapterLayer, PeftMethod, adapter_layers
from peftbench.methods.dense import merged_with_delta
from peftbench.methods.peft_format import exported, peft_key, peft_lora_config
from peftbench.methods.registry import register
from peftbench.methods.walker import ALL_LINEAR, find_targets, wrap_targets


class LoRALinear(AdapterLayer):
    """``y = base(x) + s * B (A dropout(x))``: a frozen linear layer plus a rank-r update (Sec. 4.1)."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float, rslora: bool) -> None:
        super().__init__()
        self.base = base
        self.in_features: int = base.in_features
        self.out_features: int = base.out_features
        self.r = r
        self.scaling = alpha / (math.sqrt(r) if rslora else r)
        dtype = adapter_dtype(base)
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype, device=device))
        # A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)); B = 0 (Sec. 4.1).
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta_weight(self) -> torch.Tensor:
        """``s * B A``, the update this adapter adds to the base weight."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def adapter_branch(self, x: torch.Tensor) -> torch.Tensor:
        """``s * B (A dropout(x))``, computed in the input's dtype from the fp32 master factors."""
        h = F.linear(self.dropout(x), compute_copy(self.lora_A, x))
        return F.linear(h, compute_copy(self.lora_B, x)) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.adapter_enabled:
            return y
        return y + self.adapter_branch(x).to(y.dtype)

    def merged(self) -> nn.Linear:
        """``W = W0 + s B A`` as a plain nn.Linear (dequantized if the base was 4-bit)."""
        return merged_with_delta(self.base, self.delta_weight())


def adapter_dtype(base: nn.Module) -> torch.dtype:
    """The dtype of every trainable adapter tensor: fp32 whatever the base's dtype (bf16, fp16, 4-bit), so
    the master weights, their gradients and the optimizer state keep small updates (docs/METHODS.md, LoRA,
    "Adapter dtype": with bf16 factors one AdamW step at lr 1e-4 left most entries unchanged). An fp64
    base keeps fp64. The forward casts to the compute dtype (`compute_copy`)."""
    weight = base.weight
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def compute_copy(tensor: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`tensor` in the dtype the layer computes in: the input's (a bf16 model computes in bf16 from fp32
    adapters; under autocast the matmul casts again). A no-op (the same tensor) when the dtypes match, so
    an fp32 run is unchanged; autograd casts the gradient back to the fp32 master."""
    return tensor if tensor.dtype == x.dtype else tensor.to(x.dtype)


def check_lora_hyperparameters(r: int, alpha: float | None, dropout: float) -> None:
    """One-line ConfigError for a bad rank, scaling or dropout; `alpha` None: the method has none (VeRA)."""
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise bad_value("method.r", r, "an integer > 0")
    if alpha is not None and not alpha > 0:
        raise bad_value("method.alpha", alpha, "a number > 0")
    if not 0 <= dropout < 1:
        raise bad_value("method.dropout", dropout, "a number in [0, 1)")


@register
@dataclasses.dataclass
class LoRA(PeftMethod):
    """LoRA on the selected linear layers; A and B train, everything else is frozen."""

    name: ClassVar[str] = "lora"
    mergeable: ClassVar[bool] = True
    peft_form: ClassVar[bool] = True  # also LoRA-FA, LoRA+, QLoRA, DoRA, PiSSA (not Delta-LoRA)
    size_knob: ClassVar[str | None] = "r"  # also for LoRA-FA, LoRA+, Delta-LoRA, QLoRA

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    rslora: bool = False
    target_modules: str | list[str] = ALL_LINEAR

    def validate(self) -> None:
        check_lora_hyperparameters(self.r, self.alpha, self.dropout)

    def make_layer(self, base: nn.Module) -> AdapterLayer:
        return LoRALinear(base, self.r, self.alpha, self.dropout, self.rslora)

    def attach(self, model: nn.Module) -> None:
        names = find_targets(model, self.target_modules)
        too_small = [n for n in names if min(model.get_submodule(n).weight.shape) < 1]
        if too_small:
            raise ConfigError(f"layers {too_small[:3]} are empty and cannot take a LoRA adapter")
        wrap_targets(model, names, lambda _name, layer: self.make_layer(layer))

    def peft_export(self, model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
        """PEFT's LORA adapter: ``lora_A.weight``, ``lora_B.weight`` per layer (PEFT names its matrices as
        peftbench does: A (r, in), B (out, r); scaling alpha / r, or alpha / sqrt(r) with ``use_rslora``).

        None where the trained model is not a plain LoRA on the original base: a subclass that changed the
        base weights (`modifies_base`, e.g. Delta-LoRA) or whose layers carry more than A and B and that
        does not define its own export."""
        layers = {name: layer for name, layer in adapter_layers(model) if isinstance(layer, LoRALinear)}
        if (
            self.modifies_base
            or not layers
            or any(_own_state(layer) != LORA_TENSORS for layer in layers.values())
        ):
            return None
        config = peft_lora_config(
            model, layers, r=self.r, alpha=self.alpha, dropout=self.dropout, rslora=self.rslora
        )
        tensors: dict[str, torch.Tensor] = {}
        for name, layer in layers.items():
            tensors[peft_key(name, "lora_A.weight")] = exported(layer.lora_A)
            tensors[peft_key(name, "lora_B.weight")] = exported(layer.lora_B)
        return config, tensors


#: the tensors of a plain LoRA layer besides its base (parameters or, for LoRA-FA's frozen A, buffers)
LORA_TENSORS = frozenset({"lora_A", "lora_B"})


def _own_state(layer: nn.Module) -> frozenset[str]:
    """Names of the tensors a layer holds outside its wrapped base layer."""
    names = [n for n, _ in layer.named_parameters()] + [n for n, _ in layer.named_buffers()]
    return frozenset(n for n in names if not n.startswith("base."))
