"""Preference tuning with DPO (arXiv 2305.18290): pairs (prompt, chosen, rejected), loss in `dpo.py`.

Default pairs, built deterministically from BBC News: the prompt asks for a headline for an article; the
chosen response is the article's own headline, the rejected one the headline of ANOTHER article of the same
section (the next article of that section, in content-hash order, within the same split). Articles are
split first (dedupe + content hash, `splits.py`), so no article or headline crosses splits. Any local file or
HF dataset with `prompt` / `chosen` / `rejected` columns works too (`pairing: columns`, or `auto`).
`PairTask` holds that data part (pairs, splits, tokenization, the collator); `PreferenceTask` adds DPO, and
the reward-model task (`reward_model.py`) a Bradley-Terry objective on the same pairs.

The reference model is the one `run.py` hands over with `use_reference`: the same model with the method's
adapters disabled (no second copy of the weights). Methods that train the base weights in place (full,
partial, BitFit, LN tuning) cannot disable anything (`disabled()` raises ConfigError); for them a frozen deep
copy of the model is taken at `use_reference` time, i.e. before any training step.

Metrics on held-out pairs (x 100 for accuracies): `reward_accuracy` (primary: the chosen reward
`beta * (lp_w - ref_w)` beats the rejected one), `reward_margin`, `chosen_reward`, `rejected_reward`,
`logp_accuracy` (the policy alone gives the chosen response the higher summed log-prob), `probe_loss`.
Before training, an adapter that starts as the identity gives margins of exactly 0 (reward accuracy 0).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from peftbench.errors import ConfigError
from peftbench.tasks.base import Batch
from peftbench.tasks.checks import (
    check_template,
    positive_float,
    positive_int,
    require_causal_lm,
    require_eos,
)
from peftbench.tasks.collate import IGNORE_INDEX, _pad, encode_examples, pad_token_id
from peftbench.tasks.datatask import Collate, DataTask
from peftbench.tasks.dpo import DPOOutput, dpo_loss
from peftbench.tasks.logprobs import response_logprobs
from peftbench.tasks.reference import ReferenceFactory, ReferencePolicy
from peftbench.tasks.sources import map_columns
from peftbench.tasks.splits import normalise, split_records

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "Write a headline for this news article.\n\n{source}"
PAIRINGS = ("auto", "same_group", "columns")


@dataclass
class PreferencePair:
    """One tokenized pair: the shared prompt and the two responses (each ending in EOS)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    margin: float = 0.0  # how much better chosen is than rejected, when the data say (reward models)


class PreferenceCollator:
    """A batch of B pairs as 2B right-padded rows: rows [0, B) are prompt + chosen, rows [B, 2B) prompt +
    rejected; `labels` is -100 on prompt and padding; `pairs` = B; `margins` the B pairs' margins."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, examples: Sequence[PreferencePair]) -> dict[str, Any]:
        """Build the batch dict."""
        responses = [ex.chosen_ids for ex in examples] + [ex.rejected_ids for ex in examples]
        prompts = [ex.prompt_ids for ex in examples] * 2
        full = [p + r for p, r in zip(prompts, responses, strict=True)]
        labels = [[IGNORE_INDEX] * len(p) + r for p, r in zip(prompts, responses, strict=True)]
        return {
            "input_ids": _pad(full, self.pad_id, left=False),
            "attention_mask": _pad([[1] * len(row) for row in full], 0, left=False),
            "labels": _pad(labels, IGNORE_INDEX, left=False),
            "pairs": len(examples),
            "margins": torch.tensor([ex.margin for ex in examples], dtype=torch.float32),
        }


def same_group_pairs(rows: Sequence[Mapping[str, str]]) -> tuple[list[dict[str, str]], int]:
    """Pairs from `{source, target, group}` rows: each row's target is chosen, the target of the next row of
    the same group (in the given order, wrapping around) is rejected. Rows alone in their group, or whose
    partner's target is the same text, give no pair (counted)."""
    groups: dict[str, list[Mapping[str, str]]] = {}
    for row in rows:
        groups.setdefault(row["group"], []).append(row)
    pairs: list[dict[str, str]] = []
    skipped = 0
    for members in groups.values():
        for i, row in enumerate(members):
            other = members[(i + 1) % len(members)]
            if len(members) < 2 or normalise(other["target"]) == normalise(row["target"]):
                skipped += 1
                continue
            pairs.append({"prompt": row["source"], "chosen": row["target"], "rejected": other["target"]})
    return pairs, skipped


@dataclass(kw_only=True, eq=False)
class PairTask(DataTask):
    """The data of a task on preference pairs: pairs built or read, split over prompts, tokenized, collated
    as 2B rows (chosen first). Subclasses add the objective and metrics (`PreferenceTask`: DPO).

    Args (besides `DataTask`'s: name, dataset, data_files, subset, hf_split, split, eval_batch_size, probe;
    here `split` is over sources / prompts and `eval_batch_size` counts pairs):
        pairing: `same_group` (build pairs from `source_column` / `target_column` / `group_column`),
            `columns` (read `prompt_column` / `chosen_column` / `rejected_column`), or `auto` (columns when
            the data has the chosen and rejected columns).
        source_column, target_column, group_column: for `same_group`.
        prompt_column, chosen_column, rejected_column: for `columns`.
        max_source_tokens: the source (or the prompt, for `columns`) is cut to this many tokens.
        max_target_tokens: each response is cut to this many tokens, EOS included.
        prompt: for `same_group`, the user prompt around `{source}`.
    """

    default_split: ClassVar[dict[str, Any]] = {"val": 32, "test": 128}

    pairing: str = "auto"
    source_column: str = "text"
    target_column: str = "title"
    group_column: str = "category"
    prompt_column: str = "prompt"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    max_source_tokens: int = 128
    max_target_tokens: int = 32
    prompt: str = DEFAULT_PROMPT

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pairing not in PAIRINGS:
            raise ConfigError(f"task.pairing={self.pairing!r} is not valid; accepted: {', '.join(PAIRINGS)}")
        self.group_columns = {
            "source": self.source_column,
            "target": self.target_column,
            "group": self.group_column,
        }
        self.pair_columns = {
            "prompt": self.prompt_column,
            "chosen": self.chosen_column,
            "rejected": self.rejected_column,
        }
        positive_int("max_source_tokens", self.max_source_tokens)
        positive_int("max_target_tokens", self.max_target_tokens)
        check_template(self.prompt, "source", ["source"])

    def extra_columns(self) -> dict[str, str]:
        """More `{record key: column}` read with `pairing: columns` (a subclass's, e.g. a margin); none."""
        return {}

    def pair_margin(self, record: Mapping[str, str]) -> float:
        """The margin of one pair record (from `extra_columns`); 0 unless a subclass reads one."""
        return 0.0

    # ---- data -----------------------------------------------------------------------------------------
    def _pairs(self) -> tuple[dict[str, list[dict[str, str]]], dict[str, int], str]:
        """The pairs of each split, counts worth reporting, and the pairing used."""
        raw = self.read_source()
        pairing = self.pairing
        if pairing == "auto":
            has_pairs = {self.pair_columns["chosen"], self.pair_columns["rejected"]} <= set(raw.columns)
            pairing = "columns" if has_pairs else "same_group"
        stats = raw.counts()
        if pairing == "columns":
            records, n_empty = map_columns(raw, self.pair_columns | self.extra_columns())
            splits = split_records(records, key=lambda r: r["prompt"], **self.split)
            stats |= {"empty_dropped": n_empty, "duplicates_dropped": splits.n_duplicates}
            return splits.parts(), stats, pairing
        missing = [c for c in self.group_columns.values() if c not in raw.columns]
        if missing:
            raise ConfigError(
                f"{raw.origin} has no column(s) {', '.join(map(repr, missing))} to build pairs from "
                f"(task.source_column / target_column / group_column), and no "
                f"{self.pair_columns['chosen']!r} / {self.pair_columns['rejected']!r} columns "
                f"(task.chosen_column / rejected_column); columns: {', '.join(raw.columns)}"
            )
        records, n_empty = map_columns(raw, self.group_columns)
        splits = split_records(records, key=lambda r: r["source"], **self.split)
        parts, unpaired = {}, 0
        for part, rows in splits.parts().items():
            parts[part], skipped = same_group_pairs(rows)
            unpaired += skipped
        stats |= {"empty_dropped": n_empty, "duplicates_dropped": splits.n_duplicates, "unpaired": unpaired}
        return parts, stats, pairing

    def setup(self, tokenizer: Any, seed: int) -> None:
        """Load or build the pairs, split, tokenize. Bad data raises ConfigError here."""
        require_eos(tokenizer, self.name)
        parts, stats, pairing = self._pairs()
        for part in ("val", "test", "train"):
            if not parts[part] and (part == "train" or self.split.get(part)):
                raise ConfigError(f"task {self.name!r}: the {part} split has no preference pairs")
        self._tokenizer, self._seed = tokenizer, seed
        template = self.prompt if pairing == "same_group" else "{source}"  # a prompt column is used as is
        for part, rows in parts.items():
            sources = [r["prompt"] for r in rows]
            chosen, rejected = (
                encode_examples(
                    tokenizer,
                    template,
                    sources,
                    [r[side] for r in rows],
                    self.max_source_tokens,
                    self.max_target_tokens,
                )
                for side in ("chosen", "rejected")
            )
            self._data[part] = [
                PreferencePair(c.prompt_ids, c.target_ids, r.target_ids, self.pair_margin(row))
                for c, r, row in zip(chosen, rejected, rows, strict=True)
            ]
        self.forgetting.setup(tokenizer)
        self.stats = {**stats, **self.split_sizes()}
        log.info("%s: %s", self.name, self.stats)

    def collator(self, train: bool) -> Collate:
        """B pairs as 2B right-padded rows (chosen rows first); `batch_size` counts pairs."""
        return PreferenceCollator(pad_token_id(self._tokenizer))


@dataclass(kw_only=True, eq=False)
class PreferenceTask(PairTask):
    """DPO on preference pairs (`PairTask`'s data).

    Args (besides `PairTask`'s):
        beta: the DPO temperature (paper default 0.1).
    """

    primary_metric: ClassVar[str] = "reward_accuracy"

    name: str = "preference"
    beta: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        self.beta = positive_float("beta", self.beta)
        self.reference = ReferencePolicy(self.name)
        self._cache: tuple[Any, DPOOutput, torch.Tensor, torch.Tensor] | None = None

    def head(self, model: torch.nn.Module) -> None:
        """No head; checks the model is a causal LM and remembers it (for a frozen reference copy)."""
        require_causal_lm(model, self.name)
        self.reference.remember(model)
        return None

    def use_reference(self, reference: ReferenceFactory) -> None:
        """The model with adapters disabled, or a frozen copy for methods that change the base
        (`peftbench.tasks.reference.ReferencePolicy`, shared with the RL tasks)."""
        self.reference.use(reference)

    @property
    def reference_kind(self) -> str:
        """`adapters_disabled`, `frozen_copy`, or `unset` before `use_reference`."""
        return self.reference.kind

    # ---- objective and metrics -----------------------------------------------------------------------
    def _dpo(self, model: torch.nn.Module, batch: Batch) -> tuple[DPOOutput, torch.Tensor, torch.Tensor]:
        """DPO output, the policy's summed log-probs (2B,) and response token counts (2B,). In eval (no
        grad) the result for the batch just seen is reused (the module calls `loss`, then `evaluate`)."""
        grad = torch.is_grad_enabled()
        if not grad and self._cache is not None and self._cache[0] is batch:
            return self._cache[1:]
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        policy, counts = response_logprobs(model, ids, mask, labels)
        with torch.no_grad(), self.reference.model(ids.device) as reference_model:
            reference, _ = response_logprobs(reference_model, ids, mask, labels)
        n = batch["pairs"]
        out = dpo_loss(policy[:n], policy[n:], reference[:n], reference[n:], self.beta)
        self._cache = None if grad else (batch, out, policy.detach(), counts)
        return out, policy, counts

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
        """The mean DPO loss over the batch's pairs, and the number of response tokens (both responses)."""
        out, _, counts = self._dpo(model, batch)
        return out.loss, int(counts.sum())

    def evaluate(self, model: torch.nn.Module, batch: Batch) -> dict[str, list[float]]:
        """Per pair: reward accuracy and log-prob accuracy (x 100), reward margin, chosen/rejected rewards;
        `probe_loss` once per pass."""
        out, policy, _ = self._dpo(model, batch)
        n = batch["pairs"]
        return {
            "reward_accuracy": (100.0 * (out.margins > 0).float()).tolist(),
            "reward_margin": out.margins.tolist(),
            "chosen_reward": out.chosen_rewards.tolist(),
            "rejected_reward": out.rejected_rewards.tolist(),
            "logp_accuracy": (100.0 * (policy[:n] > policy[n:]).float()).tolist(),
            **self.forgetting.scores(model, batch),
        }
