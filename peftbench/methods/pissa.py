"""PiSSA: principal singular values and singular vectors adaptation (Meng et al. 2024, arXiv 2404.02948).

Sec. 3: with ``W0 = U S V^T``, LoRA's factors start as the principal components, ``A = sqrt(S_r / s) V_r^T``
(r, in) and ``B = U_r sqrt(S_r / s)`` (out, r), so that ``s B A`` is W0's best rank-r approximation, and the
frozen base keeps the residual ``W_res = W0 - s B A``. The forward is LoRA's (``y = W_res x + s B A x``),
so the model starts at the base function up to rounding; unlike LoRA the base weights change
(`modifies_base`): disabling the adapter leaves ``W_res``, not W0.

The SVD is taken in fp32 and is full (``torch.linalg.svd``) by default; ``svd_niter: n > 0`` uses the
randomized ``torch.svd_lowrank`` with n subspace iterations (Sec. 3, "fast SVD"; PEFT's ``pissa_niter_n``).
The residual is formed from the factors as stored (after rounding to the adapter dtype), in fp32.

The layer keeps the initial factors A0, B0 (buffers, saved in the adapter file) instead of the residual:
reloading recomputes ``W0 - s B0 A0`` on the fresh base, exactly; a platform whose SVD comes out
differently gets its residual corrected by ``s (B0' A0' - B0 A0)``. They also give the export to PEFT: a
plain rank-2r LoRA on the original base (`PiSSA.peft_export`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
from torch import nn

from peftbench.errors import ConfigError, bad_value
from peftbench.methods.base import AdapterLayer, adapter_layers
from peftbench.methods.delta_lora import is_quantized
from peftbench.methods.lora import LoRA, LoRALinear
from peftbench.methods.peft_format import exported, peft_key, peft_lora_config
from peftbench.methods.registry import register
from peftbench.methods.walker import find_targets


def principal_factors(
    weight: torch.Tensor, r: int, scaling: float, niter: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``A = sqrt(S_r / s) V_r^T``, ``B = U_r sqrt(S_r / s)`` from the top-r SVD of the fp32 `weight`."""
    if niter == 0:
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        u, s, v = torch.svd_lowrank(weight, q=r, niter=niter)
        vh = v.T
    root = torch.sqrt(s / scaling)
    return root[:, None] * vh, u * root[None, :]


class PiSSALinear(LoRALinear):
    """LoRA initialised from W0's principal components; the base layer's weight becomes the residual."""

    def __init__(
        self, base: nn.Module, r: int, alpha: float, dropout: float, rslora: bool, niter: int
    ) -> None:
        super().__init__(base, r, alpha, dropout, rslora)
        with torch.no_grad():
            lora_a, lora_b = principal_factors(base.weight.float(), r, self.scaling, niter)
            self.lora_A.copy_(lora_a)
            self.lora_B.copy_(lora_b)
        self.register_buffer("init_A", self.lora_A.detach().clone())
        self.register_buffer("init_B", self.lora_B.detach().clone())
        self.rebase(torch.zeros_like(self.init_A), torch.zeros_like(self.init_B))

    @torch.no_grad()
    def rebase(self, used_a: torch.Tensor, used_b: torch.Tensor) -> None:
        """Make the base ``W_res = W0 - s B0 A0`` for the current (init_A, init_B), given that it is now
        ``W0 - s used_b used_a``; in fp32, skipped when the two pairs are equal."""
        if torch.equal(used_a, self.init_A) and torch.equal(used_b, self.init_B):
            return
        weight = self.base.weight
        original = weight.float() + (self.scaling * used_b.float()) @ used_a.float()
        weight.copy_(original - (self.scaling * self.init_B.float()) @ self.init_A.float())


@register
@dataclasses.dataclass
class PiSSA(LoRA):
    """PiSSA on the selected linear layers: A, B train from W0's principal components; W0 keeps the rest."""

    name: ClassVar[str] = "pissa"
    modifies_base: ClassVar[bool] = True

    alpha: float = 16.0  # the paper sets alpha = r (s = 1)
    dropout: float = 0.0
    svd_niter: int = 0

    def validate(self) -> None:
        super().validate()
        niter = self.svd_niter
        if isinstance(niter, bool) or not isinstance(niter, int) or niter < 0:
            raise bad_value(
                "method.svd_niter", niter, "0 (full SVD) or an integer > 0 (randomized SVD iterations)"
            )

    def attach(self, model: nn.Module) -> None:
        names = find_targets(model, self.target_modules)
        quantized = [n for n in names if is_quantized(model.get_submodule(n))]
        if quantized:
            raise ConfigError(
                f"method=pissa writes the residual W0 - sBA into the base weight, which {quantized[0]} "
                f"({type(model.get_submodule(quantized[0])).__name__}) cannot hold; "
                "accepted: an unquantized model"
            )
        too_big = [n for n in names if self.r > min(model.get_submodule(n).weight.shape)]
        if too_big:
            shape = tuple(model.get_submodule(too_big[0]).weight.shape)
            raise ConfigError(
                f"method.r={self.r} exceeds the rank of {too_big[0]} {shape}; accepted: r <= {min(shape)}"
            )
        super().attach(model)

    def make_layer(self, base: nn.Module) -> AdapterLayer:
        return PiSSALinear(base, self.r, self.alpha, self.dropout, self.rslora, self.svd_niter)

    def extra_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The initial factors A0, B0 of every layer: with the base they give back the residual."""
        state: dict[str, torch.Tensor] = {}
        for name, layer in self.layers(model).items():
            state[f"{name}.init_A"] = layer.init_A.detach().cpu().contiguous()
            state[f"{name}.init_B"] = layer.init_B.detach().cpu().contiguous()
        return state

    def load_adapter_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Load A, B, A0, B0; re-form each residual from the loaded A0, B0 where they differ from this
        model's own."""
        used = {n: (layer.init_A.clone(), layer.init_B.clone()) for n, layer in self.layers(model).items()}
        super().load_adapter_state_dict(model, state)
        for name, layer in self.layers(model).items():
            layer.rebase(*used[name])

    def peft_export(self, model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """A plain PEFT LoRA of rank 2r on the ORIGINAL base (PEFT's PiSSA-to-LoRA conversion): since
        ``W_res = W0 - s B0 A0``, the trained layer is ``W0 + s [B, -B0] [A; A0]``. The scaling stays s:
        alpha doubles with r (times sqrt 2 under rsLoRA)."""
        layers = self.layers(model)
        alpha = self.alpha * (math.sqrt(2) if self.rslora else 2)
        config = peft_lora_config(
            model, layers, r=2 * self.r, alpha=alpha, dropout=self.dropout, rslora=self.rslora
        )
        tensors: dict[str, torch.Tensor] = {}
        for name, layer in layers.items():
            tensors[peft_key(name, "lora_A.weight")] = exported(torch.cat([layer.lora_A, layer.init_A]))
            tensors[peft_key(name, "lora_B.weight")] = exported(
                torch.cat([layer.lora_B, -layer.init_B], dim=1)
            )
        return config, tensors

    @staticmethod
    def layers(model: nn.Module) -> dict[str, PiSSALinear]:
        return {n: layer for n, layer in adapter_layers(model) if isinstance(layer, PiSSALinear)}
