"""What a reward is: a callable from `(prompts, completions, metadata)`, one entry per completion (a prompt
and its metadata repeated for each of its G samples), to a float32 tensor of one reward per completion. The
verifiable rewards (`peftbench.rl.rewards`) and a trained reward model (`peftbench.rl.reward_model`) both
implement it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch

Metadata = Mapping[str, Any]


class Reward(Protocol):
    """One float reward per completion; the three sequences have one entry per completion."""

    def __call__(
        self, prompts: Sequence[str], completions: Sequence[str], metadata: Sequence[Metadata]
    ) -> torch.Tensor: ...


def check_lengths(prompts: Sequence[str], completions: Sequence[str], metadata: Sequence[Metadata]) -> None:
    """ValueError unless there is one prompt, one completion and one metadata entry per completion."""
    if not len(prompts) == len(completions) == len(metadata):
        raise ValueError(
            f"{len(prompts)} prompts, {len(completions)} completions and {len(metadata)} metadata entries: "
            "expected one of each per completion"
        )
