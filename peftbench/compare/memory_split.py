"""Where a run's peak training memory went, from its record: weights, gradients + optimizer state, the rest.

A record measures the peak (CUDA: allocated tensors; CPU: the process's resident high-water mark,
peftbench/memory.py) and the weights' bytes (`params.weight_bytes`, 4-bit weights packed, adapters
included). Gradients and optimizer state are not measured but follow from the trainable count: one
gradient plus the optimizer's state per trainable parameter, all in fp32 (peftbench keeps trainable
tensors in fp32). What is left, ``peak - weights - gradients/optimizer``, is the activations plus the
runtime (on a CPU: the interpreter, torch and the data pipeline too); it is the share LoRA-FA (Zhang et al.
2023, section 3) and gradient checkpointing act on.
"""

from __future__ import annotations

from typing import Any

from peftbench.record import Record

#: bytes of optimizer state per fp32 trainable parameter (peftbench/optim.py's optimizers)
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adam": 8, "sgd": 4, "adamw_8bit": 2, "paged_adamw_8bit": 2}
GRADIENT_BYTES = 4
SPLIT = ("weights_bytes", "grads_optimizer_bytes", "activations_rest_bytes")


def optimizer_name(record: Record) -> str:
    optim = (record.config or {}).get("optim") or {}
    return str(optim.get("name", "adamw"))


def memory_split(record: Record) -> dict[str, float] | None:
    """`{weights_bytes, grads_optimizer_bytes, activations_rest_bytes, peak_train_bytes}` of an ok run, or
    None when its record lacks the peak, the weights or the trainable count."""
    params, memory = record.params, record.memory
    peak = memory.peak_train_bytes if memory else None
    weights = params.weight_bytes if params else None
    trainable = params.trainable if params else None
    if not record.ok or peak is None or weights is None or trainable is None:
        return None
    per_param = GRADIENT_BYTES + OPTIMIZER_STATE_BYTES.get(optimizer_name(record), 8)
    grads_optimizer = float(trainable * per_param)
    return {
        "weights_bytes": float(weights),
        "grads_optimizer_bytes": grads_optimizer,
        "activations_rest_bytes": float(peak) - float(weights) - grads_optimizer,
        "peak_train_bytes": float(peak),
    }


def split_note() -> str:
    """How the split is computed, for the report."""
    return (
        "Memory split: weights = params.weight_bytes (4-bit packed where quantized, adapters included); "
        "gradients + optimizer = trainable × (4 B gradient + the optimizer's fp32 state, 8 B for AdamW); "
        "activations + rest = peak training memory - both (on a CPU the peak is the process's resident "
        "high-water mark, so the rest includes the runtime)."
    )


def mean_split(records: list[Record]) -> dict[str, Any]:
    """The seed mean of each part over `records` (parts missing when no record has a split)."""
    splits = [s for r in records if (s := memory_split(r)) is not None]
    if not splits:
        return {}
    return {k: sum(s[k] for s in splits) / len(splits) for k in (*SPLIT, "peak_train_bytes")}


__all__ = ["SPLIT", "mean_split", "memory_split", "split_note"]
