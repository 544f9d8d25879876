"""A Bradley-Terry reward model on preference pairs (InstructGPT, arXiv 2203.02155, Sec. 3.5; METHODS.md,
"Reinforcement learning from feedback", Reward model).

The pairs are the preference task's (`preference.py`, `PairTask`: the default BBC headline pairs, or any
file with prompt / chosen / rejected columns, split over prompts). The model gets a scalar head
(`reward_head.py`) on the hidden state of the last non-padding token of prompt + response (the response ends
in EOS); the head trains beside the method, is counted separately (`params.head_trainable`) and is saved
in the adapter file with the method's tensors. The loss (`bradley_terry.py`) is
`-log sigmoid(r_chosen - r_rejected - margin)`, the margin read from `task.margin_column` when the data give
one (else 0), plus `centring * mean((r_chosen + r_rejected)^2)`.

Metrics on held-out pairs: `pair_accuracy` (primary, x 100: the chosen response gets the higher reward; a
tie counts as wrong), `reward_margin` (mean of r_chosen - r_rejected), `chosen_reward`, `rejected_reward`,
and the forgetting probe. Before training the head is an untrained random projection: the "before" score
is what the base model's features give through a random head, not a trained baseline.

Beside the adapter the run writes `reward_model.json` (`save_with_adapter`): the base model's fingerprint
(`merging.task_vectors.base_fingerprint`, taken on the base as loaded, before the method changes it) and
how a prompt and a response are encoded, so that `peftbench.rl.reward_model` can load the run as a reward
and refuse a policy on another base.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from peftbench.errors import ConfigError, is_number
from peftbench.files import atomic_write_json
from peftbench.tasks.base import Batch
from peftbench.tasks.bradley_terry import BradleyTerryOutput, bradley_terry_loss
from peftbench.tasks.checks import require_causal_lm
from peftbench.tasks.collate import IGNORE_INDEX
from peftbench.tasks.preference import PairTask
from peftbench.tasks.reward_head import HEAD_NAME, ScalarHead, attach_head, decoder_of, sequence_rewards

#: the file beside the adapter that makes a run directory a reward model
REWARD_MODEL_FILE = "reward_model.json"
REWARD_MODEL_FORMAT = "peftbench-reward-model-v1"


@dataclass(kw_only=True, eq=False)
class RewardModelTask(PairTask):
    """A Bradley-Terry reward model (see the module doc).

    Args (besides `PairTask`'s):
        margin_column: a numeric column of the pairs file (`pairing: columns`) holding each pair's margin;
            null: margin 0. Pairs with an empty margin are dropped (counted in `empty_dropped`).
        centring: the coefficient c of the reward-centring term (>= 0; 0: off).
    """

    primary_metric: ClassVar[str] = "pair_accuracy"

    name: str = "reward_model"
    margin_column: str | None = None
    centring: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not is_number(self.centring) or not math.isfinite(self.centring) or self.centring < 0:
            raise ConfigError(f"task.centring={self.centring!r} is not valid; accepted: a finite number >= 0")
        column = self.margin_column
        if column is not None and (not isinstance(column, str) or not column):
            raise ConfigError(
                f"task.margin_column={self.margin_column!r} is not valid; accepted: null or a column name"
            )
        self.base_fingerprint: str | None = None
        self.hidden_size: int | None = None
        self._cache: tuple[Any, BradleyTerryOutput] | None = None

    # ---- data -----------------------------------------------------------------------------------------
    def extra_columns(self) -> dict[str, str]:
        """The margin column, when one is named."""
        return {"margin": self.margin_column} if self.margin_column else {}

    def _pairs(self) -> tuple[dict[str, list[dict[str, str]]], dict[str, int], str]:
        parts, stats, pairing = super()._pairs()
        if self.margin_column and pairing != "columns":
            raise ConfigError(
                f"task.margin_column={self.margin_column!r} needs pairs read from columns; accepted: "
                f"pairing=columns (or auto with {self.chosen_column!r} / {self.rejected_column!r} columns), "
                "or margin_column=null"
            )
        return parts, stats, pairing

    def pair_margin(self, record: Mapping[str, str]) -> float:
        """The pair's margin from the margin column (a finite number), else 0."""
        if not self.margin_column:
            return 0.0
        text = record["margin"]
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise ConfigError(
                f"task.margin_column={self.margin_column!r} holds {text!r}; accepted: finite numbers"
            )
        return value

    # ---- model ------------------------------------------------------------------------------------------
    def head(self, model: torch.nn.Module) -> ScalarHead:
        """Fingerprint the base (as loaded: call before the method is applied; none when the model already
        holds adapter layers, a later stage of a stages run), then give it the scalar head
        (`model.reward_head`), which trains beside the method."""
        from peftbench.methods.base import adapter_layers
        from peftbench.models.fingerprint import base_fingerprint

        require_causal_lm(model, self.name)
        decoder_of(model, self.name)
        if not isinstance(getattr(model, HEAD_NAME, None), ScalarHead):
            # a later stage of a stages run gets the model with its method applied: no base to fingerprint
            adapted = any(True for _ in adapter_layers(model))
            self.base_fingerprint = None if adapted else base_fingerprint(model)
        head = attach_head(model, self.name)
        self.hidden_size = int(head.weight.shape[0])
        return head

    def save_with_adapter(self, directory: Path) -> None:
        """Write `reward_model.json` beside the adapter: what `peftbench.rl.reward_model` needs to score."""
        atomic_write_json(
            Path(directory) / REWARD_MODEL_FILE,
            {
                "format": REWARD_MODEL_FORMAT,
                "base_fingerprint": self.base_fingerprint,
                "head": HEAD_NAME,
                "hidden_size": self.hidden_size,
                "max_source_tokens": self.max_source_tokens,
                "max_target_tokens": self.max_target_tokens,
            },
        )

    # ---- objective and metrics -----------------------------------------------------------------------
    def _rewards(self, model: torch.nn.Module, batch: Batch) -> BradleyTerryOutput:
        """The loss output of a batch. In eval (no grad) the result for the batch just seen is reused (the
        module calls `loss`, then `evaluate`)."""
        grad = torch.is_grad_enabled()
        if not grad and self._cache is not None and self._cache[0] is batch:
            return self._cache[1]
        rewards = sequence_rewards(model, batch["input_ids"], batch["attention_mask"])
        n = batch["pairs"]
        out = bradley_terry_loss(rewards[:n], rewards[n:], batch.get("margins"), self.centring)
        self._cache = None if grad else (batch, out)
        return out

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
        """The Bradley-Terry loss of the batch's pairs, and the number of response tokens (both responses)."""
        out = self._rewards(model, batch)
        return out.loss, int((batch["labels"] != IGNORE_INDEX).sum())

    def evaluate(self, model: torch.nn.Module, batch: Batch) -> dict[str, list[float]]:
        """Per pair: pair accuracy (x 100), reward margin, chosen and rejected rewards; `probe_loss` once per
        pass."""
        out = self._rewards(model, batch)
        return {
            "pair_accuracy": (100.0 * (out.margins > 0).float()).tolist(),
            "reward_margin": out.margins.tolist(),
            "chosen_reward": out.chosen_rewards.tolist(),
            "rejected_reward": out.rejected_rewards.tolist(),
            **self.forgetting.scores(model, batch),
        }
