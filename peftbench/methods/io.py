"""Saving and loading adapters: one safetensors file, the method's hyper-parameters in its metadata."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from peftbench.errors import ConfigError
from peftbench.methods.base import PeftMethod
from peftbench.methods.registry import build_method

ADAPTER_FILE = "adapter.safetensors"


def save_adapter(model: nn.Module, method: PeftMethod, directory: str | Path) -> Path:
    """Write ``<directory>/adapter.safetensors`` atomically; returns its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = method.final_state_dict(model)
    metadata = {"method": json.dumps(method.hyperparameters()), "format": "peftbench-adapter-v1"}
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata=metadata)
        os.replace(tmp, directory / ADAPTER_FILE)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return directory / ADAPTER_FILE


def read_method(path: str | Path) -> PeftMethod:
    """The method (with its hyper-parameters) recorded in an adapter file."""
    path = Path(path)
    if path.is_dir():
        path = path / ADAPTER_FILE
    if not path.exists():
        raise ConfigError(
            f"adapter={str(path)!r} does not exist; accepted: a directory holding {ADAPTER_FILE}"
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for truncated files
        raise ConfigError(f"adapter={str(path)!r} is not a readable safetensors file ({err})") from None
    if "method" not in metadata:
        raise ConfigError(f"adapter={str(path)!r} has no peftbench method metadata")
    return build_method(json.loads(metadata["method"]))


def load_adapter(model: nn.Module, path: str | Path) -> PeftMethod:
    """Apply the saved method to `model` (a fresh copy of the same base) and load its tensors."""
    path = Path(path)
    if path.is_dir():
        path = path / ADAPTER_FILE
    method = read_method(path)
    method.apply(model)
    method.load_adapter_state_dict(model, load_file(str(path)))
    return method
