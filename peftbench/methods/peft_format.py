"""HF PEFT's on-disk format for methods that adapt linear layers (`PeftMethod.peft_export` of DoRA, (IA)3).

PEFT writes ``adapter_config.json`` (its config class's fields) and ``adapter_model.safetensors`` whose keys
are ``base_model.model.<module path>.<tensor>`` with the adapter name removed (`get_peft_model_state_dict`).
A peftbench layer keeps the module path of the layer it wraps, so the key is that path plus PEFT's tensor
name.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from peftbench.methods.virtual_tokens import peft_task_type

#: what PEFT puts in front of a module path of the wrapped model
KEY_PREFIX = "base_model.model."


def peft_key(layer_name: str, tensor: str) -> str:
    """PEFT's safetensors key of `tensor` (``lora_A.weight``, ``ia3_l``, ...) of the layer `layer_name`."""
    return f"{KEY_PREFIX}{layer_name}.{tensor}"


def exported(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor as it goes into the file: detached, on CPU, contiguous (safetensors needs all three)."""
    return tensor.detach().cpu().contiguous()


def peft_layer_config(model: nn.Module, peft_type: str, layer_names: Iterable[str]) -> dict[str, Any]:
    """The ``adapter_config.json`` keys every PEFT layer-adapting method writes (method keys come on top).

    ``target_modules`` lists the adapted layers by full module path, as PEFT itself stores "all-linear" once
    resolved; PEFT matches a path exactly, so the loaded model adapts exactly these layers."""
    return {
        "peft_type": peft_type,
        "task_type": peft_task_type(model),
        "auto_mapping": None,
        "base_model_name_or_path": getattr(model.config, "_name_or_path", None) or None,
        "revision": None,
        "inference_mode": True,
        "target_modules": sorted(layer_names),
        "modules_to_save": None,
        "fan_in_fan_out": False,
    }


def peft_lora_config(
    model: nn.Module,
    layer_names: Iterable[str],
    *,
    r: int,
    alpha: float,
    dropout: float,
    rslora: bool,
    use_dora: bool = False,
) -> dict[str, Any]:
    """``adapter_config.json`` of PEFT's LORA type (plain, or DoRA with `use_dora`), already initialised:
    ``init_lora_weights: true`` so that loading runs no data-dependent init (PiSSA's SVD) on the base."""
    return peft_layer_config(model, "LORA", layer_names) | {
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "use_rslora": rslora,
        "use_dora": use_dora,
        "bias": "none",
        "init_lora_weights": True,
    }
