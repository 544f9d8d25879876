"""Shared test setup: offline environment, and the tiny random model every test suite can use.

`tiny_model_cfg()` (importable: `from tests.conftest import tiny_model_cfg`) returns the `model` config of
`conf/model/tiny_llama.yaml`; the session fixture `tiny_model_and_tokenizer` loads it once (read-only: use
the `tiny_model` fixture, a fresh copy, for anything that modifies the model).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests use tiny models: one thread is faster than two (no OpenMP sync), and it keeps a shared 2-core
# machine usable. Subprocesses (CLI tests) inherit it through the environment.
if not os.environ.get("OMP_NUM_THREADS", "").isdigit():
    os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def tiny_model_cfg(**overrides: Any) -> DictConfig:
    """The `model` config of `conf/model/tiny_llama.yaml`, with `overrides` merged in."""
    cfg = OmegaConf.load(CONF_DIR / "model" / "tiny_llama.yaml")
    return OmegaConf.merge(cfg, overrides) if overrides else cfg  # type: ignore[return-value]


@pytest.fixture(scope="session")
def tiny_model_and_tokenizer() -> tuple[Any, Any]:
    """`load_model(tiny_model_cfg())`, loaded once per session: do not modify it."""
    from peftbench.models import load_model

    return load_model(tiny_model_cfg())


@pytest.fixture
def tiny_model(tiny_model_and_tokenizer: tuple[Any, Any]) -> Any:
    """A fresh copy of the tiny model, free to modify (wrap, train, quantize)."""
    return copy.deepcopy(tiny_model_and_tokenizer[0])
