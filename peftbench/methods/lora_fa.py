"""LoRA-FA: LoRA with a frozen random A, only B trains (Zhang et al. 2023, arXiv 2308.03303).

Sec. 3: ``h = W0 x + s * B A x`` with LoRA's init, but A stays at its random init ("frozen-A"), so A
needs no gradient and the full-width input ``x`` need not be kept for backward: B's gradient needs only
the r-wide ``A x``. `_LoRAFABranch` makes the saving real: it saves ``A x`` and nothing full-width; the
dropout mask is regenerated from a seed in backward instead of being stored (torch's dropout keeps a
full-width mask, which plain autograd with a frozen A would still save).

The optional ``precondition`` flag is the gradient projection of the paper's v2 (what PEFT's
``create_lorafa_optimizer`` does): ``g_B <- g_B (A A^T + 1e-8 I)^-1 / s^2`` before the optimizer sees
it. It is applied inside the adapter's backward, so no special optimizer is needed; unlike PEFT, where it
runs inside the optimizer step, it acts before gradient clipping.

Export: a PEFT LORA adapter (`LoRA.peft_export`) with the frozen A as ``lora_A.weight``: PEFT's LoRA-FA is
an optimizer over a plain LoRA, so the trained adapter is a plain LoRA.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from peftbench.errors import bad_value
from peftbench.methods.base import AdapterLayer, adapter_layers
from peftbench.methods.lora import LoRA, LoRALinear
from peftbench.methods.registry import register

#: ridge added to A A^T before inverting it (the value PEFT's LoRA-FA optimizer uses)
PRECONDITION_EPS = 1e-8


def _keep_mask(like: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """The inverted-dropout mask ``bernoulli(1 - p) / (1 - p)``, reproducible from `seed`."""
    generator = torch.Generator(device=like.device).manual_seed(seed)
    mask = torch.empty(like.shape, dtype=like.dtype, device=like.device)
    return mask.bernoulli_(1.0 - p, generator=generator).div_(1.0 - p)


def precondition_grad_b(grad_b: torch.Tensor, lora_a: torch.Tensor, scaling: float) -> torch.Tensor:
    """``g_B (A A^T + 1e-8 I)^-1 / s^2`` in fp32, returned in g_B's dtype (LoRA-FA v2)."""
    a = lora_a.float()
    gram = a @ a.T + PRECONDITION_EPS * torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    # the Gram matrix is symmetric: g M^-1 = (M^-1 g^T)^T
    return (torch.linalg.solve(gram, grad_b.float().T).T / scaling**2).to(grad_b.dtype)


class _LoRAFABranch(torch.autograd.Function):
    """``y = s * B (A dropout(x))`` saving only ``A dropout(x)`` (r-wide) for backward.

    Backward: ``grad_B = s * grad_y^T (A x)``, ``grad_x = mask * (s * (grad_y B) A)``; A gets no gradient.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float,
        p: float,
        precondition: bool,
    ) -> torch.Tensor:
        seed = None
        if p > 0:
            # drawn from the global CPU generator, so runs stay reproducible under torch.manual_seed
            seed = int(torch.randint(0, 2**62, (1,)).item())
            x = x * _keep_mask(x, p, seed)
        h = F.linear(x.to(lora_a.dtype), lora_a)
        y = F.linear(h, lora_b) * scaling
        ctx.save_for_backward(h, lora_a, lora_b)
        ctx.scaling, ctx.p, ctx.seed, ctx.precondition = scaling, p, seed, precondition
        ctx.x_dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        h, lora_a, lora_b = ctx.saved_tensors
        dtype = h.dtype  # the dtype the forward computed in (the autocast dtype under autocast)
        grad_y = grad_y.to(dtype)
        grad_x = grad_b = None
        if ctx.needs_input_grad[2]:
            grad_b = ctx.scaling * (grad_y.reshape(-1, grad_y.shape[-1]).T @ h.reshape(-1, h.shape[-1]))
            grad_b = grad_b.to(lora_b.dtype)
            if ctx.precondition:
                grad_b = precondition_grad_b(grad_b, lora_a, ctx.scaling)
        if ctx.needs_input_grad[0]:
            grad_x = ((grad_y @ lora_b.to(dtype)) * ctx.scaling) @ lora_a.to(dtype)
            grad_x = grad_x.to(ctx.x_dtype)
            if ctx.p > 0:
                grad_x = grad_x * _keep_mask(grad_x, ctx.p, ctx.seed)
        return grad_x, None, grad_b, None, None, None


class LoRAFALinear(LoRALinear):
    """LoRA with A frozen as a buffer (no gradient, no optimizer state); see `_LoRAFABranch`."""

    def __init__(
        self, base: nn.Module, r: int, alpha: float, dropout: float, rslora: bool, precondition: bool
    ) -> None:
        super().__init__(base, r, alpha, dropout, rslora)
        lora_a = self.lora_A.data  # LoRA's kaiming init, now frozen
        del self.lora_A
        self.register_buffer("lora_A", lora_a)
        self.precondition = precondition

    def adapter_branch(self, x: torch.Tensor) -> torch.Tensor:
        p = self.dropout.p if isinstance(self.dropout, nn.Dropout) and self.dropout.training else 0.0
        return _LoRAFABranch.apply(x, self.lora_A, self.lora_B, self.scaling, p, self.precondition)


@register
@dataclasses.dataclass
class LoRAFA(LoRA):
    """LoRA-FA on the selected linear layers: B trains, A is a frozen random projection."""

    name: ClassVar[str] = "lora_fa"

    precondition: bool = False

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.precondition, bool):
            raise bad_value("method.precondition", self.precondition, "true or false")

    def make_layer(self, base: nn.Module) -> AdapterLayer:
        return LoRAFALinear(base, self.r, self.alpha, self.dropout, self.rslora, self.precondition)

    def extra_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The frozen A of every layer: it is random, so the adapter file must carry it."""
        return {
            f"{name}.lora_A": layer.lora_A.detach().cpu().contiguous()
            for name, layer in adapter_layers(model)
            if isinstance(layer, LoRAFALinear)
        }
