"""Task vectors: the dense change a trained method makes to each weight of its base model.

Task arithmetic (Ilharco et al. 2022, arXiv 2212.04089) calls ``tau = W_finetuned - W0`` a task vector and
merges tasks by adding them to W0. Any method whose trained model folds into plain weights has one (docs/
METHODS.md, "Merging several adapters"): the adapter methods whose layers implement ``merged()`` (LoRA and its
variants, VeRA, IA3, DoRA, PiSSA, Delta-LoRA) and the baselines that train the base's own weights (full,
partial, BitFit, LN tuning). Prompt and prefix tuning and bottleneck adapters add computation no weight can
hold and are refused.

A task vector here is a dict from the BASE model's parameter names (``model.layers.0.mlp.up_proj.weight``)
to fp32 tensors, together with a fingerprint of that base (`base_fingerprint`). It is always relative to the
ORIGINAL base: Delta-LoRA and PiSSA change the frozen weight inside their layers and full fine-tuning changes
everything, so the caller passes the base model as it was loaded (or `task_vector_from_adapter` loads the
adapter onto a copy of it). Per adapted layer:
- LoRA, LoRA+, LoRA-FA, QLoRA, VeRA (``W0 + delta_weight()``): ``delta_weight()`` itself, in fp32, so that
  a low-precision or 4-bit base adds no rounding (QLoRA's vector is ``s B A``, relative to the quantized base
  it trained on; added to the full-precision base it leaves out the quantization error);
- the others (IA3, DoRA, PiSSA, Delta-LoRA): ``merged()`` computed in fp32 (a bf16/fp16 base weight is cast
  to fp32 for the call and back, which is exact) minus the original weight, bias included where it changed.
Every other parameter that differs from the base (a baseline's trained weights, a task head) is part of the
vector too.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from peftbench.errors import ConfigError
from peftbench.methods.base import AdapterLayer, PeftMethod, adapter_layers
from peftbench.methods.dense import base_weight
from peftbench.methods.lora import LoRALinear
from peftbench.methods.vera import VeRALinear
from peftbench.models.fingerprint import base_fingerprint

#: `merged()` implementations that are exactly ``W0 + layer.delta_weight()``
ADDITIVE_MERGES = (LoRALinear.merged, VeRALinear.merged)


@dataclasses.dataclass
class TaskVector:
    """One trained run's dense change to its base: fp32 tensors keyed by the base's parameter names."""

    method: str
    #: `base_fingerprint` of the original base model
    base: str
    deltas: dict[str, torch.Tensor]

    def numel(self) -> int:
        return sum(t.numel() for t in self.deltas.values())


def has_task_vector(cls: type) -> bool:
    """A method whose trained model is a plain model once folded: its layers merge (`mergeable`), or it
    inserts none and trains the base's own weights (`BaseWeightsMethod`)."""
    from peftbench.methods.full import BaseWeightsMethod

    return bool(getattr(cls, "mergeable", False)) or issubclass(cls, BaseWeightsMethod)


def methods_with_task_vectors() -> list[str]:
    from peftbench.methods import METHODS

    return sorted(name for name, cls in METHODS.items() if has_task_vector(cls))


def check_method(method: PeftMethod) -> None:
    """One-line ConfigError for a method without a task vector (prompt/prefix tuning, bottleneck adapters)."""
    if not has_task_vector(type(method)):
        raise ConfigError(
            f"method={method.name!r} has no task vector (it adds computation no weight can hold); "
            f"accepted: {', '.join(methods_with_task_vectors())}"
        )


def check_same_base(vectors: Sequence[TaskVector], labels: Sequence[str] | None = None) -> str:
    """The common base fingerprint of `vectors`; one-line ConfigError naming the first run on another base."""
    if not vectors:
        raise ConfigError("no task vectors to merge; accepted: one or more runs")
    labels = list(labels) if labels is not None else [f"run {i}" for i in range(len(vectors))]
    first = vectors[0].base
    for vector, label in zip(vectors, labels, strict=True):
        if vector.base != first:
            raise ConfigError(
                f"{label!r} was trained on a different base model than {labels[0]!r} (base fingerprints "
                f"{vector.base[7:19]} and {first[7:19]}); accepted: runs on one base model"
            )
    return first


def _is_quantized(layer: nn.Module) -> bool:
    weight = layer.weight
    return getattr(weight, "quant_state", None) is not None or not weight.is_floating_point()


@contextlib.contextmanager
def _fp32_base(layer: nn.Module) -> Iterator[None]:
    """`layer`'s parameters in fp32 for the duration (bf16/fp16 -> fp32 -> back: exact); else as is."""
    dtype = layer.weight.dtype
    if _is_quantized(layer) or dtype.itemsize >= 4:
        yield
        return
    layer.float()
    try:
        yield
    finally:
        layer.to(dtype)


def _reference(name: str, original: Mapping[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    ref = original.get(name)
    if ref is None:
        raise ConfigError(
            f"parameter {name!r} of the adapted model is not in the base model; "
            "accepted: the base it trained on"
        )
    if tuple(ref.shape) != tuple(like.shape):
        raise ConfigError(
            f"parameter {name!r} is {tuple(like.shape)} in the adapted model but {tuple(ref.shape)} in the "
            "base model; accepted: the base it trained on"
        )
    return ref.detach()


@torch.no_grad()
def _layer_deltas(
    name: str, layer: AdapterLayer, method: PeftMethod, original: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The fp32 change of `layer`'s weight (and bias, where it changed) relative to the original base."""
    inner: nn.Module = layer.base  # type: ignore[assignment]
    quantized = _is_quantized(inner)
    if not quantized:
        ref = _reference(f"{name}.weight", original, inner.weight)
        if not method.modifies_base and not torch.equal(
            inner.weight.float(), ref.float().to(inner.weight.device)
        ):
            raise ConfigError(
                f"layer {name!r} wraps a weight that differs from the base model's; accepted: the base model "
                "the adapter was loaded on"
            )
    if not method.modifies_base and type(layer).merged in ADDITIVE_MERGES:
        return {f"{name}.weight": layer.delta_weight().detach().float()}  # type: ignore[operator]
    with _fp32_base(inner):
        merged = layer.merged()
    start = base_weight(inner).float() if quantized else ref.float().to(merged.weight.device)
    deltas = {f"{name}.weight": merged.weight.detach().float() - start}
    if merged.bias is not None:
        ref_bias = inner.bias if quantized else _reference(f"{name}.bias", original, merged.bias)
        change = merged.bias.detach().float() - ref_bias.detach().float().to(merged.bias.device)
        if change.any():
            deltas[f"{name}.bias"] = change
    return deltas


@torch.no_grad()
def task_vector(
    model: nn.Module, method: PeftMethod, base: nn.Module, fingerprint: str | None = None
) -> TaskVector:
    """The task vector of `model` (`base`'s architecture with `method` applied and trained or loaded)
    relative to `base`, the ORIGINAL base model (not changed by the method; `model` is not changed either).

    `fingerprint`: `base_fingerprint(base)` when the caller has it already. ConfigError (one line) for a
    method without a task vector or a `base` that does not fit the model."""
    check_method(method)
    original = {n: p for n, p in base.named_parameters(remove_duplicate=False)}
    deltas: dict[str, torch.Tensor] = {}
    inside: set[int] = set()
    for name, layer in adapter_layers(model):
        inside.update(id(p) for p in layer.parameters())
        deltas.update(_layer_deltas(name, layer, method, original))
    for name, param in model.named_parameters():
        if id(param) in inside or not param.is_floating_point():  # not floating: a 4-bit (QLoRA) base layer
            continue
        ref = _reference(name, original, param)
        change = param.detach().float() - ref.float().to(param.device)
        if change.any():
            deltas[name] = change
    return TaskVector(method.name, fingerprint or base_fingerprint(base), deltas)


def task_vector_from_adapter(
    base: nn.Module, adapter: str | Path, fingerprint: str | None = None
) -> TaskVector:
    """Load the adapter file (or directory) onto a copy of `base` and take its task vector; `base` itself is
    left as it is (for the next run, or to add the merged vector to). The method is checked from the file's
    metadata before anything is loaded."""
    from peftbench.methods.io import load_adapter, read_method

    check_method(read_method(adapter))
    fingerprint = fingerprint or base_fingerprint(base)
    adapted = copy.deepcopy(base)
    method = load_adapter(adapted, adapter)
    vector = task_vector(adapted.eval(), method, base, fingerprint)
    del adapted
    return vector


@torch.no_grad()
def add_to_base(model: nn.Module, delta: Mapping[str, torch.Tensor]) -> nn.Module:
    """``W <- W + delta`` in place for every named parameter (summed in fp32, rounded to W's dtype); returns
    `model`. ConfigError for a name the model lacks, a shape that differs or a quantized weight."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, change in delta.items():
        param = params.get(name)
        if param is None:
            raise ConfigError(f"task vector entry {name!r} is not a parameter of this model")
        if not param.is_floating_point() or tuple(param.shape) != tuple(change.shape):
            raise ConfigError(
                f"cannot add the task vector entry {name!r} {tuple(change.shape)} to the parameter "
                f"{param.dtype} {tuple(param.shape)}; accepted: a full-precision base of the same shape"
            )
        param.copy_((param.float() + change.to(param.device, torch.float32)).to(param.dtype))
    return model
