"""LoRA-FA: LoRA with a frozen random A, only B trains (Zhang et al. 2023, arXiv 2308.03303).

Sec. 3: ``h = W0 x + s * B A x`` with LoRA's init, but A stays at its random init ("frozen-A"), so A
needs no gradient and the full-width input ``x`` need not be kept for backward: B's gradient needs only
the r-wide ``A x``. `_LoRAFABranch` makes the saving real: it saves ``A x`` and nothing full-width; the
dropout mask is regenerated from a seed in backward instead of being stored (torch's dropout keeps a
full-width mask, which plain autograd with a frozen A would still save).

The optional ``precondition`` flag is the gradient projection of the paper's v2 (what PEFT's
``create_lorafa_optimizer`` does): ``g_B <- g_B (A A^T + 1e-8 I)^-1 / s^2`` right before the optimizer's
update. As in PEFT's ``LoraFAOptimizer`` it acts inside ``optimizer.step()``, after gradient clipping (and
after the gradients of every accumulation micro-batch are summed), so any optimizer will do: `LoRAFA`'s
`on_optimizer_built` registers `Preconditioner` as the optimizer's step pre-hook. Lightning's automatic
optimization hands ``step`` a closure that runs forward, backward and clipping, and step pre-hooks run before
that closure: the hook then wraps the closure, so that the projection follows it; a plain ``step()`` (the
gradients already computed and clipped) is projected at once. The hook is registered once per optimizer; on
resume, Lightning builds a new optimizer (`configure_optimizers`) and it is registered on that one.

Export: a PEFT LORA adapter (`LoRA.peft_export`) with the frozen A as ``lora_A.weight``: PEFT's LoRA-FA is
an optimizer over a plain LoRA, so the trained adapter is a plain LoRA.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from peftbench.errors import ConfigError, bad_value
from peftbench.methods.base import AdapterLayer, adapter_layers
from peftbench.methods.lora import LoRA, LoRALinear
from peftbench.methods.registry import register

#: ridge added to A A^T before inverting it (the value PEFT's LoRA-FA optimizer uses)
PRECONDITION_EPS = 1e-8
#: the attribute under which an optimizer holds its `Preconditioner` hook (so that it is registered once)
HOOK_ATTRIBUTE = "_peftbench_lora_fa_preconditioner"


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
    ) -> torch.Tensor:
        seed = None
        if p > 0:
            # drawn from the global CPU generator, so runs stay reproducible under torch.manual_seed
            seed = int(torch.randint(0, 2**62, (1,)).item())
            x = x * _keep_mask(x, p, seed)
        h = F.linear(x.to(lora_a.dtype), lora_a)
        y = F.linear(h, lora_b) * scaling
        ctx.save_for_backward(h, lora_a, lora_b)
        ctx.scaling, ctx.p, ctx.seed = scaling, p, seed
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
        if ctx.needs_input_grad[0]:
            grad_x = ((grad_y @ lora_b.to(dtype)) * ctx.scaling) @ lora_a.to(dtype)
            grad_x = grad_x.to(ctx.x_dtype)
            if ctx.p > 0:
                grad_x = grad_x * _keep_mask(grad_x, ctx.p, ctx.seed)
        return grad_x, None, grad_b, None, None


class LoRAFALinear(LoRALinear):
    """LoRA with A frozen as a buffer (no gradient, no optimizer state); see `_LoRAFABranch`. `precondition`:
    B's gradient is projected by the optimizer's `Preconditioner` hook (module doc)."""

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
        return _LoRAFABranch.apply(x, self.lora_A, self.lora_B, self.scaling, p)


class Preconditioner:
    """The optimizer step pre-hook of ``precondition: true``: ``g_B <- g_B (A A^T + 1e-8 I)^-1 / s^2`` for
    every layer, after the gradients are complete and clipped, right before the update (module doc)."""

    def __init__(self, layers: list[LoRAFALinear]) -> None:
        self.layers = layers

    @torch.no_grad()
    def precondition(self) -> None:
        """Project every layer's B gradient in place (a layer without a gradient is skipped)."""
        for layer in self.layers:
            grad = layer.lora_B.grad
            if grad is None:
                continue
            if grad.shape != layer.lora_B.shape:
                raise ConfigError(
                    "method.precondition=true needs B's whole gradient at the optimizer step; got one of "
                    f"shape {tuple(grad.shape)} for B {tuple(layer.lora_B.shape)} (sharded, e.g. FSDP); "
                    "accepted: precondition=false, or an unsharded strategy (single device, DDP)"
                )
            grad.copy_(precondition_grad_b(grad, layer.lora_A, layer.scaling))

    def __call__(
        self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """Step pre-hook (`args` starts with the optimizer): with a closure (Lightning's forward, backward,
        clipping) wrap it to project after it; without one the gradients are final: project now."""
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            self.precondition()
            return None

        def closure_then_precondition() -> Any:
            loss = closure()
            self.precondition()
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_precondition}
        return (args[0], closure_then_precondition, *args[2:]), kwargs


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

    def on_optimizer_built(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """With `precondition`: register the `Preconditioner` (for the layers whose B this optimizer trains)
        as `optimizer`'s step pre-hook, once per optimizer."""
        if not self.precondition or getattr(optimizer, HOOK_ATTRIBUTE, None) is not None:
            return
        trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
        layers = [
            layer
            for _, layer in adapter_layers(model)
            if isinstance(layer, LoRAFALinear) and layer.precondition and id(layer.lora_B) in trained
        ]
        hook = Preconditioner(layers)
        optimizer.register_step_pre_hook(hook)
        setattr(optimizer, HOOK_ATTRIBUTE, hook)

    def extra_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The frozen A of every layer: it is random, so the adapter file must carry it."""
        return {
            f"{name}.lora_A": layer.lora_A.detach().cpu().contiguous()
            for name, layer in adapter_layers(model)
            if isinstance(layer, LoRAFALinear)
        }
