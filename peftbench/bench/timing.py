"""Step timing (warm-up excluded, repeats, median and spread) and model FLOPs utilisation.

A repeat runs `timed_steps` training steps back to back and is timed as a whole (on CUDA with a
synchronize at both ends only, so the GPU queue is never drained inside a repeat); its time per step is
one sample. The reported step time is the median of the repeats' samples, the spread their
(max - min) / median. The benchmark interleaves the repeats of peftbench and HF PEFT, so that a slow
stretch of a shared machine hits both alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

#: dense bf16 tensor-core peak FLOP/s by GPU name (substring match); MFU is omitted for anything else
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_steps(step: Callable[[], object], device: torch.device, n: int) -> float:
    """Seconds per step over `n` back-to-back calls of `step()` (0 when n = 0)."""
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    synchronize(device)
    return (time.perf_counter() - t0) / n if n else 0.0


@dataclass(frozen=True)
class StepTimes:
    """Seconds per training step: one sample per repeat."""

    samples: tuple[float, ...]
    steps_per_repeat: int
    warmup_steps: int
    warmup_s: float

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> float:
        """(max - min) / median over the repeats."""
        return (max(self.samples) - min(self.samples)) / self.median if self.median > 0 else 0.0

    def to_dict(self) -> dict[str, float | int | list[float]]:
        return {
            "median": self.median,
            "min": min(self.samples),
            "max": max(self.samples),
            "spread": self.spread,
            "stdev": statistics.stdev(self.samples) if len(self.samples) > 1 else 0.0,
            "samples": list(self.samples),
            "steps_per_repeat": self.steps_per_repeat,
            "warmup_steps": self.warmup_steps,
            "warmup_s": self.warmup_s,
        }


def time_steps(
    step: Callable[[], object], device: torch.device, warmup: int, timed: int, repeats: int
) -> StepTimes:
    """Run `warmup` untimed steps, then `repeats` x `timed` timed steps of `step()`."""
    if timed < 1 or repeats < 1:
        raise ValueError("timed steps and repeats must be >= 1")
    warmup_s = run_steps(step, device, warmup) * warmup
    samples = tuple(run_steps(step, device, timed) for _ in range(repeats))
    return StepTimes(samples, timed, warmup, warmup_s)


# ----- FLOPs ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    """What the FLOP count needs from the base model."""

    linear_params: int
    layers: int
    attention_width: int
    vocab_size: int
    total_params: int

    @classmethod
    def of(cls, model: nn.Module) -> ModelShape:
        from peftbench.models import count_parameters

        config = model.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
        return cls(
            linear, config.num_hidden_layers, heads * head_dim, config.vocab_size, count_parameters(model)
        )


def matmul_trainable(model: nn.Module) -> int:
    """Trainable parameters used as matmul weights (weight gradients cost 2 FLOPs per token each):
    every trainable parameter of 2+ dimensions except embedding tables that are not also a head."""
    linear_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    embedding_only = {
        id(m.weight)
        for m in model.modules()
        if isinstance(m, nn.Embedding) and id(m.weight) not in linear_ids
    }
    seen: set[int] = set()
    total = 0
    for param in model.parameters():
        if param.requires_grad and param.ndim >= 2 and id(param) not in embedding_only | seen:
            seen.add(id(param))
            total += param.numel()
    return total


def model_flops(shape: ModelShape, tokens: int, seq_len: int, trainable_matmul: int) -> float:
    """Nominal FLOPs of one training step, the same for every implementation of a method: linear layers
    (head included, on every position) 2NT forward + 2NT input gradients + 2 N_trainable T weight
    gradients; attention scores and values 4 L S d T forward, 3x that with backward (PaLM's convention,
    no causal discount). Adapter matmuls other than trainable weights are not counted."""
    linear = tokens * (4 * shape.linear_params + 2 * trainable_matmul)
    attention = 3 * 4 * shape.layers * seq_len * shape.attention_width * tokens
    return float(linear + attention)


def peak_flops(device: torch.device, autocast_dtype: torch.dtype | None) -> float | None:
    """Peak dense bf16 FLOP/s of a known GPU under bf16 autocast; None otherwise (no MFU)."""
    if device.type != "cuda" or autocast_dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name:
            return flops
    return None
