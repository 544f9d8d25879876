"""Delta-LoRA: LoRA that also moves the frozen weight by the change of BA (Zi et al. 2023, arXiv 2309.02411).

Sec. 4 and Algorithm 1: the forward is LoRA's (A, B trained by AdamW) and, after every optimizer
step t > K, ``W <- W + lambda * s * (B_{t+1} A_{t+1} - B_t A_t)``; W gets no gradient and no optimizer
state. The adapter branch has NO dropout (Sec. 4: dropout breaks the identity ``grad_W = grad_{AB}``
the update relies on), so a dropout > 0 is rejected. Defaults lambda = 2, K = 500 (as in the paper).

The delta is formed from the post-step A, B and a copy of the previous ones, in fp32; a bf16/fp16 W0 keeps
an fp32 master copy (a persistent buffer) and gets the rounded value written back, so small deltas are not
lost. The modified W0 (and its master) go into the adapter file, so a reload is exact.

K counts optimizer steps (the `step` passed to `after_optimizer_step`: the number of steps done). For short
runs K may be given as a fraction of the run: ``warmup_steps: 0.1`` means 10% of the optimizer steps (the
trainer tells the method the run length through `plan_training`); an integer is an absolute step count.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
from torch import nn

from peftbench.errors import ConfigError, bad_value
from peftbench.methods.base import AdapterLayer, adapter_layers
from peftbench.methods.lora import LoRA, LoRALinear
from peftbench.methods.registry import register
from peftbench.methods.walker import find_targets


def is_quantized(layer: nn.Module) -> bool:
    """A linear whose weight is not a plain floating tensor (bitsandbytes 4-/8-bit and the like)."""
    weight = layer.weight
    if getattr(weight, "quant_state", None) is not None or not weight.is_floating_point():
        return True
    return type(layer).__name__ in {"Linear4bit", "Linear8bitLt", "LinearNF4", "LinearFP4"}


class DeltaLoRALinear(LoRALinear):
    """LoRA (no dropout) whose base weight is updated by `apply_delta` after each optimizer step."""

    def __init__(self, base: nn.Module, r: int, alpha: float, rslora: bool) -> None:
        super().__init__(base, r, alpha, 0.0, rslora)
        weight = base.weight
        # fp32 accumulator for a low-precision W0 (None, and not in the state dict, when W0 is fp32)
        master = weight.detach().float().clone() if weight.dtype != torch.float32 else None
        self.register_buffer("w0_master", master)
        # A_t, B_t: the factors after the previous optimizer step, to form B_{t+1} A_{t+1} - B_t A_t
        self.register_buffer("prev_A", self.lora_A.detach().float().clone())
        self.register_buffer("prev_B", self.lora_B.detach().float().clone())

    @torch.no_grad()
    def apply_delta(self, ratio: float) -> None:
        """``W0 += ratio * s * (B A - B_prev A_prev)`` in fp32 (none when ratio is 0); remember A, B."""
        lora_a, lora_b = self.lora_A.float(), self.lora_B.float()
        if ratio != 0:
            # one GEMM: [B, -B_prev] @ [A; A_prev] = B A - B_prev A_prev
            left = torch.cat([lora_b, -self.prev_B], dim=1)
            right = torch.cat([lora_a, self.prev_A], dim=0)
            weight = self.base.weight
            target = self.w0_master if self.w0_master is not None else weight
            target.addmm_(left, right, alpha=ratio * self.scaling)
            if self.w0_master is not None:
                weight.copy_(self.w0_master)
        self.prev_A.copy_(lora_a)
        self.prev_B.copy_(lora_b)

    @torch.no_grad()
    def sync(self, master_loaded: bool) -> None:
        """After loading: align W0 and its fp32 master (the loaded one wins) and remember the current A, B."""
        if self.w0_master is not None:
            if master_loaded:
                self.base.weight.copy_(self.w0_master)
            else:
                self.w0_master.copy_(self.base.weight.float())
        self.prev_A.copy_(self.lora_A.float())
        self.prev_B.copy_(self.lora_B.float())

    def merged(self) -> nn.Linear:
        """``W = W0 + s B A``, summed in fp32 from the master copy when there is one."""
        layer = super().merged()
        if self.w0_master is not None:
            with torch.no_grad():
                layer.weight.copy_(self.w0_master + self.delta_weight().float())
        return layer


@register
@dataclasses.dataclass
class DeltaLoRA(LoRA):
    """Delta-LoRA on the selected linear layers: A, B train; W0 follows the change of BA after step K."""

    name: ClassVar[str] = "delta_lora"
    modifies_base: ClassVar[bool] = True
    peft_form: ClassVar[bool] = False  # a PEFT LoRA adapter would leave out the changed base

    dropout: float = 0.0
    update_ratio: float = 2.0
    warmup_steps: int | float = 500

    def __post_init__(self) -> None:
        self._k: int | None = self.warmup_steps if isinstance(self.warmup_steps, int) else None

    def validate(self) -> None:
        super().validate()
        if self.dropout != 0:
            raise bad_value(
                "method.dropout", self.dropout, "0 (Delta-LoRA has no dropout on the adapter branch)"
            )
        ratio = self.update_ratio
        if (
            isinstance(ratio, bool)
            or not isinstance(ratio, int | float)
            or not math.isfinite(ratio)
            or ratio < 0
        ):
            raise bad_value("method.update_ratio", ratio, "a finite number >= 0 (paper: 2)")
        steps = self.warmup_steps
        is_count = isinstance(steps, int) and not isinstance(steps, bool) and steps >= 0
        is_fraction = isinstance(steps, float) and 0 <= steps < 1
        if not (is_count or is_fraction):
            raise bad_value(
                "method.warmup_steps",
                steps,
                "an integer >= 0 (optimizer steps before W0 updates) or a fraction of the run in [0, 1)",
            )

    def attach(self, model: nn.Module) -> None:
        quantized = [
            n for n in find_targets(model, self.target_modules) if is_quantized(model.get_submodule(n))
        ]
        if quantized:
            raise ConfigError(
                f"method=delta_lora cannot update a quantized base weight ({quantized[0]} is "
                f"{type(model.get_submodule(quantized[0])).__name__}); accepted: an unquantized model"
            )
        super().attach(model)

    def make_layer(self, base: nn.Module) -> AdapterLayer:
        return DeltaLoRALinear(base, self.r, self.alpha, self.rslora)

    def plan_training(self, total_steps: int) -> None:
        """Resolve a fractional ``warmup_steps`` against the run's optimizer steps."""
        if isinstance(self.warmup_steps, float):
            self._k = round(self.warmup_steps * total_steps)

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        """After optimizer step number `step` (1-based): update W0 when ``step > warmup_steps``."""
        if self._k is None:
            raise RuntimeError("warmup_steps is a fraction of the run: call plan_training(total_steps) first")
        ratio = self.update_ratio if step > self._k else 0.0
        for layer in self.layers(model):
            layer.apply_delta(ratio)

    def extra_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The modified W0 of every adapted layer, and its fp32 master when W0 is low precision."""
        state: dict[str, torch.Tensor] = {}
        for name, layer in adapter_layers(model):
            if isinstance(layer, DeltaLoRALinear):
                state[f"{name}.base.weight"] = layer.base.weight
                if layer.w0_master is not None:
                    state[f"{name}.w0_master"] = layer.w0_master
        return {k: v.detach().cpu().contiguous() for k, v in state.items()}

    def load_adapter_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        super().load_adapter_state_dict(model, state)
        for name, layer in adapter_layers(model):
            if isinstance(layer, DeltaLoRALinear):
                layer.sync(master_loaded=f"{name}.w0_master" in state)

    @staticmethod
    def layers(model: nn.Module) -> list[DeltaLoRALinear]:
        return [layer for _, layer in adapter_layers(model) if isinstance(layer, DeltaLoRALinear)]
