"""Multilingual dialogue SFT on the embedded chatterbot corpus: a line of a dialogue -> the reply to it.

The data are the dialogues of `chatterbot-corpus` (`chatterbot.py`), in the languages of `languages`
(default: every language besides English with at least `min_dialogues` dialogues; 13 in
chatterbot-corpus 1.3.3: bengali, chinese, dutch, german, indonesian, italian, japanese, korean, persian,
portuguese, spanish, traditionalchinese, ukrainian). This is phase 2 of the two-phase recipe (continual
fine-tuning: a task first, then multilingual chat data; conf/experiment/multilingual_two_phase.yaml).

Examples: every pair of consecutive turns of a dialogue, `turn[i]` as the user message (chat template,
`prompt` around it, cut to `max_source_tokens`) and `turn[i + 1]` as the response (cut to
`max_target_tokens`, EOS included); the loss is on the response tokens only (supervised fine-tuning).

Splits, per language: the DIALOGUES are deduplicated and split by content hash (`splits.py`, `split`
counts are dialogues per language), so the turns of one dialogue never straddle two splits; then the pairs
are made, test first, val, train, and a pair already taken (the same line and reply, normalised) is not
taken again: no pair is in two splits and none twice in one. Nothing depends on the seed or file order.

Metrics (teacher-forced, no generation): `loss_<language>` (token-weighted mean response-token cross-entropy
of that language's held-out pairs) and `token_accuracy_<language>` (x 100, response tokens whose greedy
next-token prediction is right); overall `token_accuracy` (primary; higher is better, as lr search and
the comparison expect) and `loss_mean` (the mean of the per-language losses, each language weighted
equally); the module adds `loss`, the token-weighted loss over every language. Plus the forgetting probe
(`probe_loss`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from peftbench.errors import ConfigError
from peftbench.tasks.base import Batch, mean_metrics
from peftbench.tasks.chatterbot import (
    CHATTERBOT,
    MIN_DIALOGUES,
    DialogueCorpus,
    available_languages,
    cached_corpus,
)
from peftbench.tasks.checks import check_template, positive_int, require_eos
from peftbench.tasks.collate import CausalLMCollator, Encoded, encode_examples, pad_token_id
from peftbench.tasks.datatask import Collate, DataTask
from peftbench.tasks.logprobs import labelled_logits
from peftbench.tasks.objectives import target_token_loss
from peftbench.tasks.splits import content_hash, split_records

log = logging.getLogger(__name__)

#: raw per-example outputs of `evaluate`, consumed by `aggregate` (never reported as metrics)
RAW_KEYS = ("_language", "_nll", "_tokens", "_hits")


@dataclass
class DialogueExample(Encoded):
    """A tokenized (line, reply) pair and its language."""

    language: str = ""


class DialogueCollator(CausalLMCollator):
    """`CausalLMCollator` (no generation prompts: the metrics are teacher-forced) plus `languages`."""

    def __call__(self, examples: Sequence[Encoded]) -> dict[str, Any]:
        """Build the batch dict."""
        batch = super().__call__(examples)
        batch["languages"] = [getattr(ex, "language", "") for ex in examples]
        return batch


def reply_token_scores(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: the summed cross-entropy of the labelled tokens, their count, and how many of them are the
    argmax of the model's next-token distribution. The head runs on the labelled positions only."""
    selected, targets, rows, counts = labelled_logits(model, input_ids, attention_mask, labels)
    nll = F.cross_entropy(selected, targets, reduction="none")
    hits = (selected.argmax(dim=-1) == targets).float()
    zeros = torch.zeros(labels.shape[0], dtype=torch.float32, device=labels.device)
    return zeros.index_add(0, rows, nll), counts, zeros.index_add(0, rows, hits)


@dataclass(kw_only=True, eq=False)
class DialogueTask(DataTask):
    """Dialogue SFT on chatterbot's multilingual corpus (see the module doc).

    Args (besides `DataTask`'s name, split, eval_batch_size, probe; `dataset` must be `chatterbot`):
        languages: the corpus's languages to use (directory names, e.g. `german`); null: every language
            but English with at least `min_dialogues` dialogues.
        min_dialogues: the threshold of the default selection.
        corpus_dir: a directory laid out like the package's `data/` (`<language>/*.yml`); null: the
            installed chatterbot-corpus.
        prompt: the user message; `{source}` = the dialogue line (cut to `max_source_tokens`).
        max_source_tokens: the line is cut to this many tokens.
        max_target_tokens: the reply is cut to this many tokens, EOS included.
    """

    primary_metric: ClassVar[str] = "token_accuracy"
    default_split: ClassVar[dict[str, Any]] = {"val": 8, "test": 16, "max_train": None}

    name: str = "dialogue"
    dataset: str = CHATTERBOT
    languages: Sequence[str] | None = None
    min_dialogues: int = MIN_DIALOGUES
    corpus_dir: str | None = None
    prompt: str = "{source}"
    max_source_tokens: int = 64
    max_target_tokens: int = 48

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dataset != CHATTERBOT or self.data_files:
            what = "data_files" if self.data_files else "dataset"
            raise ConfigError(
                f"task.{what}={getattr(self, what)!r} is not valid for task {self.name!r}; accepted: "
                f"dataset={CHATTERBOT!r}, data_files=null (other data: task=instruction with a chat file)"
            )
        positive_int("min_dialogues", self.min_dialogues)
        positive_int("max_source_tokens", self.max_source_tokens)
        positive_int("max_target_tokens", self.max_target_tokens)
        check_template(self.prompt, "source", ["source"])
        accepted = available_languages(self.corpus_dir)
        if self.languages is not None:
            chosen = list(self.languages) if not isinstance(self.languages, str) else [self.languages]
            unknown = [lang for lang in chosen if lang not in accepted]
            if unknown or not chosen or len(set(chosen)) != len(chosen):
                why = f"unknown: {', '.join(map(str, unknown))}" if unknown else "empty or repeated"
                raise ConfigError(
                    f"task.languages={chosen} is not valid ({why}); "
                    f"accepted: a list of distinct names among {', '.join(accepted)}, or null"
                )
            self.languages = chosen
        self._cache: tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    # ---- data -----------------------------------------------------------------------------------------
    def corpus(self) -> DialogueCorpus:
        """The chatterbot corpus (every language; read once per process)."""
        return cached_corpus(self.corpus_dir)

    def resolve_languages(self) -> list[str]:
        """`languages`, or the default selection; ConfigError when the default selects none."""
        if self.languages is not None:
            return list(self.languages)
        corpus = self.corpus()
        chosen = corpus.default_languages(self.min_dialogues)
        if not chosen:
            counts = ", ".join(f"{k} {v}" for k, v in corpus.counts().items())
            raise ConfigError(
                f"task.min_dialogues={self.min_dialogues} selects no language besides English ({counts}); "
                "accepted: a lower threshold or task.languages=[...]"
            )
        return chosen

    def language_pairs(self, language: str) -> dict[str, list[tuple[str, str]]]:
        """One language's `(line, reply)` pairs per split (see the module doc: dialogue-level split, then
        each pair taken once, test first)."""
        dialogues = [{"turns": turns} for turns in self.corpus().dialogues[language]]
        try:
            splits = split_records(dialogues, key=lambda d: "\n".join(d["turns"]), **self.split)
        except ConfigError as error:
            raise ConfigError(
                f"task.languages: {language!r} has {len(dialogues)} dialogues, too few for this split: "
                f"{error}"
            ) from None
        self.stats[f"duplicate_dialogues_{language}"] = splits.n_duplicates
        seen: set[str] = set()
        out: dict[str, list[tuple[str, str]]] = {}
        repeated = 0
        for part in ("test", "val", "train"):
            out[part] = []
            for dialogue in getattr(splits, part):
                turns = dialogue["turns"]
                for line, reply in pairwise(turns):
                    key = content_hash(f"{line}\n{reply}")
                    if key in seen:
                        repeated += 1
                        continue
                    seen.add(key)
                    out[part].append((line, reply))
        self.stats[f"repeated_pairs_dropped_{language}"] = repeated
        return out

    def setup(self, tokenizer: Any, seed: int) -> None:
        """Read the corpus, split each language, tokenize. Bad data raise ConfigError here."""
        require_eos(tokenizer, self.name)
        self._tokenizer, self._seed = tokenizer, seed
        corpus = self.corpus()
        self.stats = {f"source_{k}": v for k, v in corpus.stats.items()}
        self.languages_used = self.resolve_languages()
        parts: dict[str, list[DialogueExample]] = {"train": [], "val": [], "test": []}
        for language in self.languages_used:
            self.stats[f"dialogues_{language}"] = len(corpus.dialogues[language])
            for part, pairs in self.language_pairs(language).items():
                encoded = encode_examples(
                    tokenizer,
                    self.prompt,
                    [line for line, _ in pairs],
                    [reply for _, reply in pairs],
                    self.max_source_tokens,
                    self.max_target_tokens,
                )
                parts[part] += [DialogueExample(**vars(e), language=language) for e in encoded]
                self.stats[f"{part}_{language}"] = len(encoded)
        for part, rows in parts.items():
            if not rows:
                raise ConfigError(
                    f"task {self.name!r} has no {part} pairs for languages {self.languages_used}; "
                    "accepted: task.split with val and test >= 1 dialogue per language"
                )
            self._data[part] = rows
        self.stats |= self.split_sizes()
        self.forgetting.setup(tokenizer)
        log.info("%s from %s, languages %s: %s", self.name, corpus.origin, self.languages_used, self.stats)

    def collator(self, train: bool) -> Collate:
        """Right-padded batches carrying each example's language."""
        return DialogueCollator(pad_token_id(self._tokenizer))

    # ---- objective and metrics -----------------------------------------------------------------------
    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
        """Mean cross-entropy over response tokens, and their number. In evaluation (no grad) it comes from
        the per-example sums `evaluate` reuses (the module calls `loss`, then `evaluate`, on one batch)."""
        if torch.is_grad_enabled():
            return target_token_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        nll, counts, _ = self._scores(model, batch)
        n = int(counts.sum())
        return nll.sum() / max(n, 1), n

    def _scores(
        self, model: torch.nn.Module, batch: Batch
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`reply_token_scores` of the batch, cached for the batch just seen."""
        if self._cache is not None and self._cache[0] is batch:
            return self._cache[1], self._cache[2], self._cache[3]
        with torch.no_grad():
            scores = reply_token_scores(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        self._cache = (batch, *scores)
        return scores

    def evaluate(self, model: torch.nn.Module, batch: Batch) -> dict[str, list[Any]]:
        """Per example: its language, summed response-token loss, token count and right predictions (raw,
        for `aggregate`); `probe_loss` once per pass."""
        nll, counts, hits = self._scores(model, batch)
        out: dict[str, list[Any]] = {
            "_language": list(batch["languages"]),
            "_nll": nll.tolist(),
            "_tokens": counts.tolist(),
            "_hits": hits.tolist(),
        }
        return out | self.forgetting.scores(model, batch)

    def aggregate(self, outputs: Mapping[str, Sequence[Any]]) -> dict[str, float]:
        """`loss_<language>`, `token_accuracy_<language>` (token-weighted within the language),
        `token_accuracy` (over every token), `loss_mean` (languages weighted equally), and the means of any
        other key (`probe_loss`)."""
        metrics = mean_metrics({k: v for k, v in outputs.items() if k not in RAW_KEYS})
        sums: dict[str, list[float]] = {}
        for language, nll, tokens, hits in zip(*(outputs.get(k, []) for k in RAW_KEYS), strict=True):
            entry = sums.setdefault(language, [0.0, 0.0, 0.0])
            entry[0] += nll
            entry[1] += tokens
            entry[2] += hits
        losses = []
        for language, (nll, tokens, hits) in sorted(sums.items()):
            if tokens:
                metrics[f"loss_{language}"] = nll / tokens
                metrics[f"token_accuracy_{language}"] = 100.0 * hits / tokens
                losses.append(nll / tokens)
        total = sum(t for _, t, _ in sums.values())
        if total:
            metrics["token_accuracy"] = 100.0 * sum(h for _, _, h in sums.values()) / total
            metrics["loss_mean"] = sum(losses) / len(losses)
        return metrics
