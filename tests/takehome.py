"""Builders shared by the "taking a result home" tests (export, merge, generate): a trained-looking
adapter on tests.helpers.tiny_llama, a local base model directory, a run directory as `peftbench.run`
leaves it."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftbench.methods import build_method
from peftbench.methods.io import save_adapter
from tests.helpers import clone_model, tiny_llama
from tests.test_method_matrix import ROWS, method_config


def perturb(model: nn.Module, method: Any, scale: float = 0.1, seed: int = 7) -> None:
    """Move every trainable tensor away from its init (LoRA's B away from 0) and run the method's
    after-step hook once (Delta-LoRA's W0 update), as a little training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in method.trainable_parameters(model):
            param.add_(scale * torch.randn(param.shape, generator=generator).to(param.dtype))
    method.plan_training(10)
    method.after_optimizer_step(model, 1)


def trained(name: str, base: nn.Module, **overrides: Any) -> tuple[nn.Module, Any]:
    """`(model, method)`: a copy of `base` with method `name` (its conf/method yaml, the method matrix's tiny
    overrides, then `overrides`) applied and perturbed, in eval mode."""
    model = clone_model(base)
    torch.manual_seed(0)
    method = build_method({**method_config(name), **overrides})
    method.apply(model)
    perturb(model, method)
    return model.eval(), method


def matrix_base(name: str, **kwargs: Any) -> nn.Module:
    """tests.helpers.tiny_llama with the method matrix's model arguments for `name` (BitFit: biases)."""
    return tiny_llama(**{**ROWS[name].model_kwargs, **kwargs})


@cache
def tokenizer_dir() -> Path:
    """The embedded SmolLM2 tokenizer (it has a chat template), as a directory."""
    from peftbench.models import tokenizer_dir as embedded_tokenizer_dir

    return embedded_tokenizer_dir()


def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir()), local_files_only=True)


def save_base(directory: Path, **kwargs: Any) -> Path:
    """A tiny random Llama with the SmolLM2 tokenizer's vocabulary and that tokenizer, saved as a local
    model directory (`model.name_or_path=<directory>`: no download)."""
    tok = tokenizer()
    model = tiny_llama(vocab=len(tok), **kwargs)
    model.config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model.save_pretrained(str(directory))
    tok.save_pretrained(str(directory))
    return directory


def write_run(run_dir: Path, model: nn.Module, method: Any, model_config: dict[str, Any] | None) -> Path:
    """A run directory as `peftbench.run` leaves it: ``adapter/adapter.safetensors`` and a ``record.json``
    whose config holds `model_config` (no record when None)."""
    save_adapter(model, method, run_dir / "adapter")
    if model_config is not None:
        record = {"status": "ok", "method": method.name, "config": {"model": model_config}}
        (run_dir / "record.json").write_text(json.dumps(record))
    return run_dir
