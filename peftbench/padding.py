"""How much of the training compute went to padding: padded positions / all positions of the training
batches (`attention_mask == 0` over its size), counted by a Lightning callback and written into the run's
record as `padding` (`task.group_by_length=true` lowers it, see `peftbench/tasks/sampler.py`).

Under DDP every rank counts its own batches and the counts are summed over the ranks at the end of
training. The counts go into checkpoints (the callback's state), so a resumed run reports the whole run;
under DDP the restored part is rank 0's count on every rank (the ranks' counts differ only by the lengths
of their shares).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


def mask_counts(batch: Any) -> tuple[int, int]:
    """`(tokens, positions)` of a batch: attended positions and all positions of its `attention_mask`
    (`(0, 0)` for a batch without one)."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if not isinstance(mask, torch.Tensor):
        return 0, 0
    return int(mask.sum()), mask.numel()


class PaddingStats(Callback):
    """Counts the attended and all positions of every training batch (`record["padding"]`)."""

    def __init__(self) -> None:
        self.tokens = 0
        self.positions = 0
        self._all: tuple[int, int] | None = None  # summed over ranks at the end of training

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        tokens, positions = mask_counts(batch)
        self.tokens += tokens
        self.positions += positions

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        counts = torch.tensor([self.tokens, self.positions], dtype=torch.float64)
        if trainer.world_size > 1:  # every rank reaches this hook: a collective is safe here
            counts = trainer.strategy.reduce(counts, reduce_op="sum")
        self._all = (int(counts[0]), int(counts[1]))

    def state_dict(self) -> dict[str, int]:
        return {"tokens": int(self.tokens), "positions": int(self.positions)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tokens = int(state_dict.get("tokens", 0))
        self.positions = int(state_dict.get("positions", 0))

    def summary(self) -> dict[str, Any]:
        """`{"fraction", "padded_tokens", "positions"}` over all ranks (this rank's before training ended)."""
        tokens, positions = self._all if self._all is not None else (self.tokens, self.positions)
        return {
            "fraction": (positions - tokens) / positions if positions else None,
            "padded_tokens": positions - tokens,
            "positions": positions,
        }
