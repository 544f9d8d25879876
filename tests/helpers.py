"""Small builders shared by the tests (no tokenizer, no downloads), and the checks several test files make."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]


def tiny_llama(
    seed: int = 0,
    vocab: int = 128,
    tie: bool = True,
    bias: bool = False,
    hidden: int = 32,
    intermediate: int = 64,
    kv_heads: int = 2,
) -> LlamaForCausalLM:
    """A 2-layer random Llama with every linear kind (q/k/v/o, gate/up/down) and GQA (by default: 4 query,
    2 key/value heads)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        tie_word_embeddings=tie,
        attention_bias=bias,
        mlp_bias=bias,
    )
    return LlamaForCausalLM(config).eval()


def token_batch(vocab: int = 128, batch: int = 2, length: int = 9, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=generator)


def clone_model(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model)


def load_nf4(directory: Path, **options: Any) -> torch.nn.Module:
    """The model saved in `directory`, loaded in 4 bits as PEFT's QLoRA recipe does (transformers'
    BitsAndBytesConfig: NF4, double quantization, fp32 compute), `options` passed on to `from_pretrained`.
    transformers leaves bitsandbytes' CPU repack on: it is switched off, the same trap and the same fix as
    in peftbench.methods.qlora, so that both sides take one kernel path. Skips where this transformers /
    bitsandbytes pair cannot load a 4-bit model on this machine."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from peftbench.methods.qlora import disable_cpu_repack

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(directory), quantization_config=quantization, dtype=torch.float32, **options
        )
    except Exception as err:  # pragma: no cover - depends on the transformers / bitsandbytes pair
        pytest.skip(f"bitsandbytes cannot load a 4-bit model here ({type(err).__name__}: {err})")
    for module in model.modules():
        disable_cpu_repack(module)
    return model.eval()


# ---- command lines -------------------------------------------------------------------------------------
def run_env(results: Path) -> dict[str, str]:
    """The environment of a test's `peftbench.run`: offline W&B and hub, records under `results`."""
    return {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "PEFTBENCH_RESULTS": str(results)}


def run_module(
    module: str, args: list[str], env: Mapping[str, str], cwd: Path = ROOT, timeout: int = 600
) -> subprocess.CompletedProcess:
    """`python -m <module> <args>` in `cwd`, its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def cli_smoke(tmp_path: Path, task: str, model: str, overrides: list[str]) -> dict[str, Any]:
    """A 2-step run of `task` on `model` through the CLI (no logger, no evaluation before training, no
    adapter file), `overrides` after those; its record, checked to say ok, `task` and 2 steps."""
    from tests.test_run import run_cli

    result = run_cli(
        [
            f"task={task}",
            f"model={model}",
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
            "batch_size=2",
            "logger=none",
            "evaluate_before=false",
            "save_adapter=false",
            *overrides,
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "record.json").read_text())
    assert record["status"] == "ok" and record["task"] == task and record["steps"] == 2
    return record


def assert_finite(values: Mapping[str, float], keys: Iterable[str]) -> None:
    for key in keys:
        assert math.isfinite(values[key]), key


def bare_trainer(max_steps: int, **options: Any) -> Any:
    """A CPU `lightning.Trainer` with nothing around the fit loop (no logger, progress bar, summary,
    validation or checkpointing unless `options` say so): for tests that drive `PeftModule` directly."""
    import lightning as L

    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        **{"enable_checkpointing": False, **options},
    )
