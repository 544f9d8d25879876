"""Optimizers and the warm-up + decay schedule, built from a method's parameter groups."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from peftbench.errors import bad_value

OPTIMIZERS = ("adamw", "adam", "sgd", "adamw_8bit", "paged_adamw_8bit")
SCHEDULES = ("cosine", "linear", "constant")


def build_optimizer(groups: list[dict[str, Any]], cfg: Any) -> torch.optim.Optimizer:
    """AdamW by default; bitsandbytes' 8-bit / paged AdamW when asked (CUDA only, AdamW fallback on CPU)."""
    name = cfg.name
    if name not in OPTIMIZERS:
        raise bad_value("optim.name", name, OPTIMIZERS)
    betas = tuple(cfg.betas)
    if name in ("adamw_8bit", "paged_adamw_8bit") and torch.cuda.is_available():
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW8bit if name.startswith("paged") else bnb.optim.AdamW8bit
        return cls(groups, lr=cfg.lr, betas=betas, eps=cfg.eps)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=betas[0])
    if name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=betas, eps=cfg.eps)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps)


def check_optim_config(cfg: Any) -> None:
    if cfg.name not in OPTIMIZERS:
        raise bad_value("optim.name", cfg.name, OPTIMIZERS)
    if not (isinstance(cfg.lr, int | float) and cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise bad_value("optim.lr", cfg.lr, "a finite number > 0")
    if cfg.weight_decay < 0:
        raise bad_value("optim.weight_decay", cfg.weight_decay, "a number >= 0")
    if cfg.schedule not in SCHEDULES:
        raise bad_value("optim.schedule", cfg.schedule, SCHEDULES)
    if not 0 <= cfg.warmup_ratio < 1:
        raise bad_value("optim.warmup_ratio", cfg.warmup_ratio, "a number in [0, 1)")


def lr_lambda(schedule: str, total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Linear warm-up to the peak lr, then cosine / linear decay to 0 (or constant)."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant" or total_steps <= warmup_steps:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
