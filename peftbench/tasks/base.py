"""The Task protocol: what the LightningModule and `run.py` need from a task, and nothing more.

A task owns its data (loading, dedupe, deterministic split, tokenization), its objective (`loss`) and its
metrics: `evaluate` gives per-example values for each batch, the module gathers them over the whole
evaluation pass and hands them to `aggregate`, which returns the pass's metrics (default: `mean_metrics`,
the mean of every list; a corpus-level metric such as macro-F1 is computed there from the gathered
predictions). It never sees the PEFT method.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

import torch
from torch.utils.data import DataLoader

Batch = dict[str, Any]


def mean_metrics(outputs: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """The default `aggregate`: the mean of each non-empty list of per-example values."""
    return {key: float(sum(values)) / len(values) for key, values in outputs.items() if len(values)}


@runtime_checkable
class Task(Protocol):
    """A fine-tuning task: data module + objective + metrics.

    Attributes:
        name: the registry name (`task=<name>` on the command line).
        primary_metric: the metric the comparison ranks by, logged as `val/<metric>` and `test/<metric>`.
    """

    name: str
    primary_metric: str

    def setup(self, tokenizer: Any, seed: int) -> None:
        """Load, dedupe, split and tokenize. Raise `ConfigError` on bad data before any training."""
        ...

    def train_dataloader(self, batch_size: int) -> DataLoader:
        """Training batches, shuffled with a generator seeded from `setup`'s seed."""
        ...

    def val_dataloader(self, batch_size: int) -> DataLoader:
        """Validation batches in a fixed order."""
        ...

    def test_dataloader(self, batch_size: int) -> DataLoader:
        """Test batches in a fixed order."""
        ...

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
        """Mean token loss over the target tokens, and the number of target tokens."""
        ...

    def evaluate(self, model: torch.nn.Module, batch: Batch) -> dict[str, list[Any]]:
        """Per-example values, one list per key, each as long as the batch (a once-per-pass value, e.g. the
        forgetting probe, is a list of one on the pass's first batch): scores, or raw outputs such as
        predicted and true labels for `aggregate` to turn into corpus-level metrics."""
        ...

    def aggregate(self, outputs: Mapping[str, Sequence[Any]]) -> dict[str, float]:
        """The metrics of one evaluation pass from `outputs`: each key's values over every batch of the pass,
        in loader order. Keys holding raw outputs are consumed here and not reported; `mean_metrics` is
        the default (every key a score, averaged over the examples)."""
        ...

    def split_sizes(self) -> dict[str, int]:
        """Number of examples in each split: `{"train": n, "val": n, "test": n}`."""
        ...

    def head(self, model: torch.nn.Module) -> torch.nn.Module | None:
        """The task's own trainable head (e.g. a classifier), trained beside the method's parameters and
        counted separately; `None` when the task adds none. Called before the method is applied."""
        ...

    def use_reference(self, reference: Callable[[], AbstractContextManager[torch.nn.Module]]) -> None:
        """Receive a context factory that runs the model as its frozen reference (adapters disabled),
        for objectives that compare against the untuned model (DPO). Most tasks ignore it."""
        ...
