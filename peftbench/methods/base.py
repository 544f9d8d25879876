"""The method interface: what every PEFT method decides, and nothing the trainer needs to know about.

A method is one small class (one file) that says
- which layers it wraps or adds (`attach`, using the shared walker in `walker.py`);
- which parameters train (`trainable_parameters`, found structurally from its adapter layers);
- its optimizer parameter groups (`param_groups`; checked to cover every trainable parameter once);
- an optional hook after each real optimizer step (`after_optimizer_step`), and one when the optimizer is
  built (`on_optimizer_built`, e.g. to act inside `optimizer.step()`, after gradient clipping);
- how it merges, disables (for a reference model) and saves (`merge`, `disabled`, `adapter_state_dict`,
  `final_state_dict`).
The LightningModule only calls these; it never branches on a method's name.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from peftbench.errors import ConfigError


class AdapterLayer(nn.Module):
    """Base of every module a method inserts into the model.

    Subclasses that wrap an existing layer keep it as ``self.base`` (frozen). Their own parameters,
    everything outside ``self.base``, are the adapter parameters.
    """

    adapter_enabled: bool = True

    def adapter_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """This layer's own parameters (not those of the wrapped base layer), with local names."""
        base = getattr(self, "base", None)
        base_ids = {id(p) for p in base.parameters()} if isinstance(base, nn.Module) else set()
        for name, param in self.named_parameters():
            if id(param) not in base_ids:
                yield name, param

    def merged(self) -> nn.Module:
        """A plain module computing the same function with the adapter folded in."""
        raise NotImplementedError(f"{type(self).__name__} cannot be merged")


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield name, module


def freeze(model: nn.Module) -> None:
    for param in model.parameters():
        param.requires_grad_(False)


@dataclasses.dataclass
class PeftMethod:
    """Base of all methods. Subclasses are dataclasses whose fields are the method's hyper-parameters
    (the keys of ``conf/method/<name>.yaml``)."""

    name: ClassVar[str] = "base"
    #: the base weights change during training (full, partial, Delta-LoRA): export must save them
    modifies_base: ClassVar[bool] = False
    #: the adapter can be folded into the base weights
    mergeable: ClassVar[bool] = False
    #: the method inserts layers of its own (else it trains the base's own weights: full, partial, BitFit)
    inserts_layers: ClassVar[bool] = True
    #: the method has an HF PEFT equivalent, written by `peft_export` (peftbench/export.py)
    peft_form: ClassVar[bool] = False
    #: at initialisation the adapted model computes exactly the base model's function
    identity_at_init: ClassVar[bool] = True
    #: the integer hyper-parameter that sets the adapter's size (LoRA's r), or None: equal-parameter-budget
    #: comparisons (peftbench/budget.py) choose it so that the trainable count fits the budget
    size_knob: ClassVar[str | None] = None

    # ----- building -------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check hyper-parameters; raise ConfigError with one line naming the bad value."""

    def attach(self, model: nn.Module) -> None:
        """Insert the method's layers into the (already frozen) model."""

    def apply(self, model: nn.Module, head: nn.Module | None = None) -> nn.Module:
        """Validate, freeze the base, attach the adapters, and mark exactly the trainable parameters.

        `head` is a task head (e.g. a classifier) that trains alongside the method's parameters. An image +
        text model is adapted in its language model only (`walker.adapted_part`); its projector trains
        beside the method like a head, and its freeze switches have the last word
        (peftbench/models/multimodal.py).
        """
        from peftbench.methods.walker import adapted_part, mark_task_head

        self.validate()
        freeze(model)
        if head is not None:
            mark_task_head(head)  # a head attached to the model (reward, value) is never a method target
        self.attach(adapted_part(model))
        self.mark_trainable(model, head)
        if not any(p.requires_grad for p in model.parameters()):
            raise ConfigError(f"method={self.name!r} found no parameter to train in this model")
        return model

    def mark_trainable(self, model: nn.Module, head: nn.Module | None = None) -> None:
        """Make the method's parameters (in the adapted part), `head` and what the model trains beside the
        method trainable, then apply the model's freeze switches (an image model's)."""
        from peftbench.methods.walker import adapted_part, apply_model_switches, trained_beside

        for _, param in self.trainable_parameters(adapted_part(model)):
            param.requires_grad_(True)
        for module in [head, *trained_beside(model)]:
            if module is not None:
                module.requires_grad_(True)
        apply_model_switches(model)

    # ----- training -------------------------------------------------------------------------------
    def trainable_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """Parameters the method trains, found structurally from its adapter layers."""
        found: list[tuple[str, nn.Parameter]] = []
        for layer_name, layer in adapter_layers(model):
            found += [(f"{layer_name}.{n}", p) for n, p in layer.adapter_parameters()]
        return found

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer groups. Default: every trainable parameter in one group."""
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": params, "lr": lr, "weight_decay": weight_decay, "name": "all"}]

    def plan_training(self, total_steps: int) -> None:
        """Told the run's number of optimizer steps before training (for schedules given as fractions)."""

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        """Called after every real optimizer step (not after accumulation micro-steps)."""

    def on_optimizer_built(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Called once after the optimizer is built (again for each new optimizer, e.g. on resume), e.g. to
        register ``optimizer.register_step_pre_hook``, which runs inside ``optimizer.step()``. Under
        Lightning's automatic optimization ``step`` gets a closure that runs forward, backward and gradient
        clipping, and the pre-hook runs before it: a hook that needs the clipped gradients wraps that closure
        (a pre-hook may return new arguments), as LoRA-FA's does (`lora_fa.py`). Default: nothing."""

    # ----- merging, disabling, saving --------------------------------------------------------------
    def merge(self, model: nn.Module) -> nn.Module:
        """Fold every adapter layer into a plain layer, in place; returns the model."""
        if not self.mergeable:
            raise ConfigError(f"method={self.name!r} cannot be merged into the base weights")
        from peftbench.methods.walker import replace_module

        for name, layer in list(adapter_layers(model)):
            replace_module(model, name, layer.merged())
        return model

    @contextlib.contextmanager
    def disabled(self, model: nn.Module) -> Iterator[nn.Module]:
        """Run the model without its adapters (e.g. the DPO reference model), restoring them after.

        A method that changes the base weights in place (`modifies_base`: full, partial, Delta-LoRA) has no
        way back to the base function: it refuses, so callers keep a frozen copy instead."""
        if self.modifies_base:
            raise ConfigError(
                f"method={self.name!r} changes the base weights in place: disabling its adapters does not "
                "give the base model back; a reference model (e.g. for DPO) needs a frozen copy"
            )
        layers = [layer for _, layer in adapter_layers(model)]
        previous = [layer.adapter_enabled for layer in layers]
        for layer in layers:
            layer.adapter_enabled = False
        try:
            yield model
        finally:
            for layer, flag in zip(layers, previous, strict=True):
                layer.adapter_enabled = flag

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Everything needed to rebuild the trained adapter on a fresh base: trainable tensors plus
        the method's extra state (e.g. VeRA's projection seed, Delta-LoRA's modified weights)."""
        state = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        state.update(self.extra_state(model))
        return state

    def final_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors of the adapter file written after training (`io.save_adapter`). Default: exactly
        `adapter_state_dict`. A method that trains through a parameterisation inference does not need (prefix
        tuning's MLP) keeps only its result here, and its `load_adapter_state_dict` accepts both forms;
        checkpoints keep `adapter_state_dict` (everything needed to go on training)."""
        return self.adapter_state_dict(model)

    def extra_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Non-trainable tensors the adapter file must carry (default: none)."""
        return {}

    def load_adapter_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Load tensors saved by `adapter_state_dict` into a model the method was applied to."""
        own = dict(model.named_parameters()) | dict(model.named_buffers())
        missing = [k for k in state if k not in own]
        if missing:
            raise ConfigError(f"adapter tensors {missing[:3]} do not exist in this model; wrong base model?")
        with torch.no_grad():
            for key, value in state.items():
                own[key].copy_(value.to(own[key].dtype))

    def peft_export(self, model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
        """The trained adapter in HF PEFT's format: the contents of ``adapter_config.json`` and the tensors
        of ``adapter_model.safetensors`` (PEFT's key names), or None where PEFT has no such method.

        `model` is the (unwrapped) transformers model the method was applied to. Written to disk by
        `peftbench.export`; `peft.PeftModel.from_pretrained(base, dir)` must then give peftbench's logits."""
        return None

    def hyperparameters(self) -> dict[str, Any]:
        """The method's config (what `build_method` takes back)."""
        return {"name": self.name, **dataclasses.asdict(self)}

    def describe(self) -> dict[str, Any]:
        """What a record states about the method: its hyper-parameters plus the choices it made on this
        machine (e.g. QLoRA's `auto` compute dtype and why). Default: the hyper-parameters."""
        return self.hyperparameters()


def check_groups_cover(groups: list[dict[str, Any]], model: nn.Module) -> None:
    """Assert the optimizer groups hold every trainable parameter exactly once and nothing frozen."""
    seen: dict[int, int] = {}
    for group in groups:
        for param in group["params"]:
            seen[id(param)] = seen.get(id(param), 0) + 1
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    twice = [k for k, v in seen.items() if v > 1]
    missing = trainable - seen.keys()
    frozen = seen.keys() - trainable
    if twice or missing or frozen:
        raise AssertionError(
            f"optimizer groups are wrong: {len(twice)} parameters in two groups, "
            f"{len(missing)} trainable parameters in none, {len(frozen)} frozen parameters included"
        )
