"""Rewards for RL from feedback: a callable protocol, verifiable rewards computed from the data, and a
weighted sum of several.

A reward maps `(prompts, completions, metadata)`, three sequences of the same length with one entry per
completion (a prompt and its metadata repeated for each of its G samples), to a float32 tensor of one
reward per completion. The verifiable rewards here score in [0, 1]:
- `rouge_l`: ROUGE-L F-measure (Lin 2004; Porter stemmer, `peftbench.tasks.rouge`) of the completion's first
  line against `metadata[i]["reference"]`, the verifiable reward for headlines and summaries;
- `label_match`: 1 when the completion's normalised words (lower case, no punctuation, first line, as
  `peftbench.tasks.labels` normalises answers) equal those of `metadata[i]["label"]`, else 0 (`prefix=True`
  accepts trailing words, as the instruction task's exact-match metric does);
- `format`: 1 when the completion is a single line of `min_words`..`max_words` words, else 0.
A trained reward model fits the same protocol: `reward_model` with option `path`, a `task=reward_model` run
directory (`peftbench.rl.reward_model`, which also refuses a policy on another base: `check_policy_base`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from peftbench.errors import ConfigError, bad_value, is_int, is_number
from peftbench.rl.reward_protocol import Metadata, Reward, check_lengths
from peftbench.tasks.labels import answer_matches, normalise_answer
from peftbench.tasks.rouge import rouge_scores


def _field(metadata: Sequence[Metadata], key: str, reward: str) -> list[str]:
    missing = [i for i, m in enumerate(metadata) if key not in m]
    if missing:
        raise ConfigError(
            f"reward {reward!r} needs {key!r} in every example's metadata (missing in #{missing[0]})"
        )
    return [str(m[key]) for m in metadata]


def first_line(text: str) -> str:
    """The first line of a completion, stripped (how the generation tasks read an answer)."""
    return (text.strip().splitlines() or [""])[0].strip()


@dataclass(frozen=True)
class RougeLReward:
    """ROUGE-L F of the completion's first line against the reference, in [0, 1]."""

    reference_key: str = "reference"

    def __call__(
        self, prompts: Sequence[str], completions: Sequence[str], metadata: Sequence[Metadata]
    ) -> torch.Tensor:
        check_lengths(prompts, completions, metadata)
        references = _field(metadata, self.reference_key, "rouge_l")
        scores = rouge_scores([first_line(c) for c in completions], references)["rouge_l"]
        return torch.tensor(scores, dtype=torch.float32) / 100.0


@dataclass(frozen=True)
class LabelMatchReward:
    """1 for the right label word(s) (normalised), else 0; `prefix` also accepts words after the label."""

    label_key: str = "label"
    prefix: bool = False

    def __call__(
        self, prompts: Sequence[str], completions: Sequence[str], metadata: Sequence[Metadata]
    ) -> torch.Tensor:
        check_lengths(prompts, completions, metadata)
        labels = _field(metadata, self.label_key, "label_match")
        if self.prefix:
            hits = [answer_matches(c, label) for c, label in zip(completions, labels, strict=True)]
        else:
            hits = [
                bool(normalise_answer(label)) and normalise_answer(c) == normalise_answer(label)
                for c, label in zip(completions, labels, strict=True)
            ]
        return torch.tensor(hits, dtype=torch.float32)


@dataclass(frozen=True)
class FormatReward:
    """1 when the completion (stripped) is one line of `min_words`..`max_words` words, else 0."""

    min_words: int = 1
    max_words: int = 16
    single_line: bool = True

    def __post_init__(self) -> None:
        if not (is_int(self.min_words) and is_int(self.max_words)) or not (
            0 <= self.min_words <= self.max_words
        ):
            raise ConfigError(
                f"format reward: min_words={self.min_words!r}, max_words={self.max_words!r} are not valid; "
                "accepted: integers with 0 <= min_words <= max_words"
            )

    def __call__(
        self, prompts: Sequence[str], completions: Sequence[str], metadata: Sequence[Metadata]
    ) -> torch.Tensor:
        check_lengths(prompts, completions, metadata)
        ok = []
        for completion in completions:
            text = completion.strip()
            words = len(text.split())
            one_line = len(text.splitlines()) <= 1
            ok.append((one_line or not self.single_line) and self.min_words <= words <= self.max_words)
        return torch.tensor(ok, dtype=torch.float32)


@dataclass(frozen=True)
class WeightedReward:
    """`sum_k w_k * reward_k`; `components()` gives each part's (unweighted) rewards for logging."""

    parts: tuple[tuple[str, float, Reward], ...]

    def components(
        self, prompts: Sequence[str], completions: Sequence[str], metadata: Sequence[Metadata]
    ) -> dict[str, torch.Tensor]:
        return {name: reward(prompts, completions, metadata) for name, _, reward in self.parts}

    def check_policy_base(self, model: torch.nn.Module) -> None:
        """ConfigError when a part trained on a base model (a reward model) was trained on another base than
        `model`, the policy as loaded (before its method is applied); verifiable parts accept any policy."""
        for _, _, reward in self.parts:
            check = getattr(reward, "check_policy_base", None)
            if check is not None:
                check(model)

    def __call__(
        self, prompts: Sequence[str], completions: Sequence[str], metadata: Sequence[Metadata]
    ) -> torch.Tensor:
        check_lengths(prompts, completions, metadata)
        total = torch.zeros(len(completions), dtype=torch.float32)
        for _, weight, reward in self.parts:
            total = total + weight * reward(prompts, completions, metadata).float()
        return total


VERIFIABLE: dict[str, Callable[..., Reward]] = {
    "rouge_l": RougeLReward,
    "label_match": LabelMatchReward,
    "format": FormatReward,
}


def _reward_model(**options: Any) -> Reward:
    """A trained reward model: `path`, a `task=reward_model` run directory (`peftbench.rl.reward_model`)."""
    import inspect

    from peftbench.rl.reward_model import load_reward_model

    accepted = list(inspect.signature(load_reward_model).parameters)
    unknown = sorted(set(options) - set(accepted))
    if unknown or "path" not in options:
        raise ConfigError(
            f"reward 'reward_model': options {dict(options)!r} are not valid "
            f"({'unknown: ' + ', '.join(unknown) if unknown else 'path missing'}); accepted: "
            f"{', '.join(accepted)} (path required: a reward-model run directory)"
        )
    return load_reward_model(**options)


#: every reward `build_reward` knows: the verifiable ones and a trained reward model
REWARDS: dict[str, Callable[..., Reward]] = {**VERIFIABLE, "reward_model": _reward_model}


def build_reward(
    weights: str | Mapping[str, Any], options: Mapping[str, Mapping[str, Any]] | None = None
) -> WeightedReward:
    """A weighted sum of rewards (verifiable ones, a reward model) from `{name: weight}` (a bare name means
    weight 1), each built with `options[name]` as keyword arguments. Unknown names, unknown options and
    weights that are not finite numbers >= 0 (or are all 0) get a one-line ConfigError naming what is
    accepted."""
    if isinstance(weights, str):
        weights = {weights: 1.0}
    if not isinstance(weights, Mapping) or not weights:
        raise bad_value(
            "reward", weights, f"a reward name or a {{name: weight}} mapping of {', '.join(REWARDS)}"
        )
    options = dict(options or {})
    for name in [*weights, *options]:
        if name not in REWARDS:
            raise bad_value("reward", name, REWARDS)
    parts = []
    for name, weight in weights.items():
        if not is_number(weight) or not math.isfinite(weight) or weight < 0:
            raise bad_value(f"reward weight of {name}", weight, "a finite number >= 0")
        try:
            reward = REWARDS[name](**options.get(name, {}))
        except TypeError as err:
            raise ConfigError(
                f"reward {name!r}: bad options {dict(options.get(name, {}))!r} ({err})"
            ) from None
        parts.append((name, float(weight), reward))
    if all(weight == 0 for _, weight, _ in parts):
        raise bad_value("reward weights", dict(weights), "finite numbers >= 0, not all 0")
    return WeightedReward(tuple(parts))
