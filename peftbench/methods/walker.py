"""The one module walker every method uses: find the layers to adapt and swap them in place."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from torch import nn

from peftbench.errors import ConfigError

ALL_LINEAR = "all-linear"
#: set on a task's head (a classifier, a reward or value head) by `PeftMethod.apply`: never a method target
TASK_HEAD_MARK = "peftbench_task_head"


def mark_task_head(head: nn.Module) -> None:
    """Mark `head` (and so its linear layers) as a task head: `all-linear` and name selections skip it."""
    setattr(head, TASK_HEAD_MARK, True)


def adapted_part(model: nn.Module) -> nn.Module:
    """The part of `model` a method adapts: the language model of an image + text model (the model says so
    through `adapted_module()`, peftbench/models/multimodal.py), else the whole model. The encoder and the
    projector are never seen by a method's selection."""
    part = getattr(model, "adapted_module", None)
    return part() if callable(part) else model


def trained_beside(model: nn.Module) -> list[nn.Module]:
    """The modules a model trains beside the method like a task head (an image model's projector, by its
    freeze switches); none for a plain model."""
    found = getattr(model, "trained_beside", None)
    return list(found()) if callable(found) else []


def apply_model_switches(model: nn.Module) -> None:
    """The model's own freeze switches (an image model's `apply_freeze_switches`), after the method marked
    its parameters; nothing for a plain model."""
    switches = getattr(model, "apply_freeze_switches", None)
    if callable(switches):
        switches()


def _linear_types() -> tuple[type[nn.Module], ...]:
    """nn.Linear plus bitsandbytes' quantized linears when bitsandbytes imports."""
    types: list[type[nn.Module]] = [nn.Linear]
    try:
        import bitsandbytes as bnb

        types += [bnb.nn.Linear4bit, bnb.nn.Linear8bitLt]
    except Exception:  # pragma: no cover - bitsandbytes is a runtime dependency but may fail to load
        pass
    return tuple(types)


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, _linear_types())


def _output_layer_names(model: nn.Module) -> set[str]:
    """Names of the output head (lm_head / classifier) and of task heads marked by `mark_task_head` (a
    reward or value head attached to the model): never adapted."""
    heads: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    head_names = {"lm_head", "score", "classifier", "cls"}
    for name, module in model.named_modules():
        is_output = out is not None and module is out
        if is_output or name.split(".")[-1] in head_names or getattr(module, TASK_HEAD_MARK, False):
            heads.add(name)
    return heads


def linear_layer_names(model: nn.Module) -> list[str]:
    """Qualified names of every linear layer in the model's blocks (the output head excluded)."""
    heads = _output_layer_names(model)
    return [
        name
        for name, module in model.named_modules()
        if is_linear(module) and not any(name == h or name.startswith(h + ".") for h in heads)
    ]


def find_targets(model: nn.Module, target_modules: str | Sequence[str]) -> list[str]:
    """Resolve `target_modules` to qualified layer names.

    - ``"all-linear"``: every linear layer of the attention and MLP blocks (not the output head);
    - a list of names: a layer matches when its last name component equals one of them
      (``["q_proj", "v_proj"]``) or when its full name equals it;
    - any other string: a regular expression matched against the full name (``re.fullmatch``).
    A selection that matches nothing is a ConfigError listing the layer names that exist.
    """
    candidates = linear_layer_names(model)
    if isinstance(target_modules, str) and target_modules == ALL_LINEAR:
        selected = candidates
    elif isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        selected = [n for n in candidates if pattern.fullmatch(n)]
    else:
        wanted = [str(t) for t in target_modules]
        selected = [n for n in candidates if n.split(".")[-1] in wanted or n in wanted]
        leaf_names = {n.split(".")[-1] for n in candidates}
        unknown = [t for t in wanted if t not in leaf_names and t not in candidates]
        if unknown:
            raise ConfigError(
                f"method.target_modules={unknown} match no linear layer; "
                f"accepted: {ALL_LINEAR}, a regex, or names among {sorted(leaf_names)}"
            )
    if not selected:
        leaf_names = sorted({n.split(".")[-1] for n in candidates})
        raise ConfigError(
            f"method.target_modules={target_modules!r} matches no linear layer; "
            f"accepted: {ALL_LINEAR}, a regex, or names among {leaf_names}"
        )
    return selected


def get_submodule(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Swap the submodule called `name` for `new`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def wrap_targets(model: nn.Module, names: Sequence[str], wrap: Callable[[str, nn.Module], nn.Module]) -> None:
    """Replace each named layer by `wrap(name, layer)`, keeping the layer's train/eval mode."""
    for name in names:
        old = model.get_submodule(name)
        replace_module(model, name, wrap(name, old).train(old.training))
