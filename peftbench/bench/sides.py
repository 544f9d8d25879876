"""Building the two sides of one method: peftbench's trainee on a fresh copy of the base model
(`build_ours`, loss `PEFTBENCH_LOSS_PATH`), the context HF PEFT's side is built from (`build_context`,
for `peft_side.build_peft`) and the on-demand `save_pretrained` directory of the base model that PEFT's
QLoRA loads (`PretrainedDir`)."""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from peftbench.bench.peft_side import Batch, BuildContext, Trainee, enable_checkpointing
from peftbench.bench.settings import Settings

PEFTBENCH_LOSS_PATH = (
    "peftbench.tasks.objectives.target_token_loss: decoder hidden states, output head on the labelled "
    "positions only, fp32 cross-entropy"
)


def build_ours(method_template: Any, base: nn.Module, settings: Settings) -> Trainee:
    """peftbench's `method` on a fresh copy of `base`, its own optimizer groups, `target_token_loss`."""
    from peftbench.methods import check_groups_cover
    from peftbench.tasks.objectives import target_token_loss

    method = copy.deepcopy(method_template)
    model = copy.deepcopy(base).to(device=settings.device, dtype=settings.dtype)
    if settings.gradient_checkpointing:
        enable_checkpointing(model)
    method.apply(model)
    model.train()
    groups = method.param_groups(model, lr=settings.lr, weight_decay=settings.weight_decay)
    check_groups_cover(groups, model)
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.999), eps=1e-8)
    method.on_optimizer_built(model, optimizer)  # e.g. LoRA-FA's preconditioning, as in a run
    method.plan_training(settings.total_steps)

    def loss(batch: Batch) -> torch.Tensor:
        return target_token_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])[0]

    def after_step(step: int) -> None:
        method.after_optimizer_step(model, step)

    notes = [f"{type(method).__name__} + torch AdamW over the method's param_groups"]
    return Trainee("peftbench", model, optimizer, loss, PEFTBENCH_LOSS_PATH, after_step, notes)


def build_context(settings: Settings, pretrained_dir: Callable[[], Path]) -> BuildContext:
    return BuildContext(
        device=settings.device,
        dtype=settings.dtype,
        lr=settings.lr,
        weight_decay=settings.weight_decay,
        betas=(0.9, 0.999),
        eps=1e-8,
        gradient_checkpointing=settings.gradient_checkpointing,
        pretrained_dir=pretrained_dir,
    )


class PretrainedDir:
    """A `save_pretrained` directory of the base model (for PEFT QLoRA's quantized load), made on demand:
    the embedded model's cache directory when the base is the embedded model, else a temporary copy."""

    def __init__(self, base: nn.Module, model_cfg: DictConfig) -> None:
        self.base = base
        self.model_cfg = model_cfg
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    def __call__(self) -> Path:
        from peftbench.models import ModelSpec, model_dir

        spec = ModelSpec.from_config(self.model_cfg)
        if spec.scheme == "embedded":
            return model_dir(spec.source)
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="peftbench-bench-")
            self.base.save_pretrained(self._tmp.name)
        return Path(self._tmp.name)

    def cleanup(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
