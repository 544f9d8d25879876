"""The task's data loaders: shuffled by a seeded generator for training, in a fixed order for evaluation with
the first batch of each pass marked (`PASS_START`), so a task can reset corpus-level metrics and run
once-per-pass probes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader

#: batch key set on the first batch of every evaluation pass (see `MarkPassStart`)
PASS_START = "eval_pass_start"


class MarkPassStart:
    """Wraps a collate function for a fixed-order eval loader: sets `batch[PASS_START]` to whether the batch
    holds the split's first example (the first batch of every evaluation pass), so a task can reset running
    corpus-level metrics and run once-per-pass probes."""

    def __init__(self, collate: Callable[[Sequence[Any]], dict[str, Any]], data: Sequence[Any]) -> None:
        self.collate = collate
        self.first = data[0] if len(data) else None

    def __call__(self, examples: Sequence[Any]) -> dict[str, Any]:
        batch = self.collate(examples)
        batch[PASS_START] = bool(examples) and examples[0] is self.first
        return batch


def make_loader(
    data: Sequence[Any],
    batch_size: int,
    collate: Callable[[Sequence[Any]], dict[str, Any]],
    shuffle: bool,
    seed: int,
) -> DataLoader:
    """A DataLoader over `data`: shuffled by a generator seeded with `seed`, or in a fixed order with the
    first batch of each pass marked (`MarkPassStart`)."""
    if shuffle:
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(data, batch_size=batch_size, shuffle=True, generator=generator, collate_fn=collate)  # type: ignore[arg-type]
    return DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=MarkPassStart(collate, data))  # type: ignore[arg-type]
