"""Text classification (default: Rotten Tomatoes sentiment; `topic_classification`: 5-way BBC section).

Two formulations, chosen by the model (`formulation: auto`):
- `classifier` (a sequence-classification model, e.g. the MiniLM encoder): the model's own head (`classifier`
  / `score`) maps the text to `num_labels` logits; the loss is cross-entropy over the labels. `head(model)`
  returns that head, so it trains beside the method's parameters.
- `verbaliser` (a causal LM): the prompt asks for the label and the target is the label's word (e.g.
  `positive`); the loss is cross-entropy on the label word's tokens, and the prediction is the argmax, over
  the label words, of the next-token logits of each word's FIRST token right after the prompt (no
  generation). The first tokens must differ between labels. `head(model)` returns None.

Metrics (x 100): `accuracy` (primary) and `macro_f1` (corpus-level over the pass; see `labels.py`), plus
the forgetting probe's `probe_loss` on causal LMs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from peftbench.errors import ConfigError
from peftbench.tasks.base import Batch, mean_metrics
from peftbench.tasks.checks import check_template, positive_int
from peftbench.tasks.collate import IGNORE_INDEX, _pad, pad_token_id, render_prompt, truncate_texts
from peftbench.tasks.datatask import Collate, DataTask
from peftbench.tasks.heads import classifier_head, is_causal_lm
from peftbench.tasks.labels import accuracy, confusion_matrix, macro_f1
from peftbench.tasks.logprobs import hidden_and_head
from peftbench.tasks.sources import ROTTEN_TOMATOES, map_columns
from peftbench.tasks.splits import split_records

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "Classify this text. Answer with one word: {choices}.\n\n{text}"
FORMULATIONS = ("auto", "classifier", "verbaliser")


@dataclass
class LabelledText:
    """One tokenized example: the model input, its class index and (verbaliser) the prompt length."""

    input_ids: list[int]
    label: int
    prompt_length: int = 0  # verbaliser: tokens before the label word; classifier: 0
    target_ids: list[int] = field(default_factory=list)  # verbaliser: the label word's tokens


class ClassificationCollator:
    """Right-padded `input_ids`, `attention_mask`, `class_labels` (B,); verbaliser batches also carry
    token `labels` (-100 except on the label word) and `prompt_lengths` (B,)."""

    def __init__(self, pad_id: int, verbaliser: bool) -> None:
        self.pad_id, self.verbaliser = pad_id, verbaliser

    def __call__(self, examples: Sequence[LabelledText]) -> dict[str, Any]:
        """Build the batch dict."""
        batch: dict[str, Any] = {
            "input_ids": _pad([ex.input_ids for ex in examples], self.pad_id, left=False),
            "attention_mask": _pad([[1] * len(ex.input_ids) for ex in examples], 0, left=False),
            "class_labels": torch.tensor([ex.label for ex in examples], dtype=torch.long),
        }
        if self.verbaliser:
            labels = [[IGNORE_INDEX] * ex.prompt_length + ex.target_ids for ex in examples]
            batch["labels"] = _pad(labels, IGNORE_INDEX, left=False)
            batch["prompt_lengths"] = torch.tensor([ex.prompt_length for ex in examples], dtype=torch.long)
        return batch


def _labels_list(name: str, value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Sequence) or len(value) < 2:
        raise ConfigError(f"task.{name}={value!r} is not valid; accepted: null or a list of >= 2 strings")
    items = [str(v).strip() for v in value]
    if len(set(items)) != len(items) or not all(items):
        raise ConfigError(f"task.{name}={value!r} is not valid; accepted: distinct, non-empty strings")
    return items


@dataclass(kw_only=True, eq=False)
class ClassificationTask(DataTask):
    """Classify `text_column` into the labels of `label_column`.

    Args (besides `DataTask`'s: name, dataset, data_files, subset, hf_split, split, eval_batch_size, probe):
        text_column, label_column: the input text and its label (any value; compared as a string).
        labels: the label values in class-index order; records with other labels are dropped (counted).
            null: every label value in the data, sorted.
        label_words: the verbaliser's word per label (default: the label values themselves).
        num_labels: the number of labels (the encoder's head is built with it); must match `labels`.
        formulation: `auto` (classifier on a sequence-classification model, verbaliser on a causal LM),
            `classifier` or `verbaliser`.
        max_tokens: the text is cut to this many tokens.
        prompt: the verbaliser's user prompt, with `{text}` and optionally `{choices}` (the label words).
    """

    primary_metric: ClassVar[str] = "accuracy"
    default_split: ClassVar[dict[str, Any]] = {"val": 100, "test": 300}
    causal_lm_only: ClassVar[bool] = False

    name: str = "classification"
    dataset: str = ROTTEN_TOMATOES
    eval_batch_size: int | None = 32
    text_column: str = "text"
    label_column: str = "category"
    labels: Sequence[str] | None = None
    label_words: Sequence[str] | None = None
    num_labels: int | None = None
    formulation: str = "auto"
    max_tokens: int = 128
    prompt: str = DEFAULT_PROMPT

    def __post_init__(self) -> None:
        super().__post_init__()
        self.labels = _labels_list("labels", self.labels)
        self.label_words = _labels_list("label_words", self.label_words)
        if self.labels and self.label_words and len(self.labels) != len(self.label_words):
            raise ConfigError(
                f"task.label_words has {len(self.label_words)} entries for {len(self.labels)} labels; "
                "accepted: one word per label"
            )
        if self.num_labels is not None:
            positive_int("num_labels", self.num_labels)
        if self.labels and self.num_labels is not None and self.num_labels != len(self.labels):
            raise ConfigError(
                f"task.num_labels={self.num_labels} but task.labels lists {len(self.labels)}; accepted: "
                f"num_labels={len(self.labels)}"
            )
        if self.formulation not in FORMULATIONS:
            raise ConfigError(
                f"task.formulation={self.formulation!r} is not valid; accepted: {', '.join(FORMULATIONS)}"
            )
        positive_int("max_tokens", self.max_tokens)
        check_template(self.prompt, "text", ["text", "choices"])
        self._records: dict[str, list[dict[str, str]]] = {}
        self._first_token_ids: torch.Tensor | None = None
        self._cache: tuple[Any, torch.Tensor, int, torch.Tensor] | None = None

    # ---- data -----------------------------------------------------------------------------------------
    def setup(self, tokenizer: Any, seed: int) -> None:
        """Load, map columns, fix the label set, dedupe and split. Tokenization waits for the formulation
        (known from `head(model)`, or from `task.formulation`)."""
        raw = self.read_source()
        records, n_empty = map_columns(raw, {"text": self.text_column, "label": self.label_column})
        found = sorted({r["label"] for r in records})
        labels = self.labels or found
        if len(labels) < 2:
            raise ConfigError(
                f"{raw.origin} column {self.label_column!r} has {len(labels)} label value(s) {labels}; "
                "accepted: a column with >= 2 labels"
            )
        if self.num_labels is not None and self.num_labels != len(labels):
            raise ConfigError(
                f"task.num_labels={self.num_labels} but {raw.origin} has {len(labels)} labels "
                f"({', '.join(labels[:10])}); accepted: num_labels={len(labels)} (or list task.labels)"
            )
        absent = [label for label in labels if label not in found]
        if absent:
            raise ConfigError(
                f"task.labels {absent} never occur in column {self.label_column!r} of {raw.origin}; "
                f"found: {', '.join(found[:10])}{', ...' if len(found) > 10 else ''}"
            )
        index = {label: i for i, label in enumerate(labels)}
        kept = [r for r in records if r["label"] in index]
        if self.label_words and len(self.label_words) != len(labels):
            raise ConfigError(
                f"task.label_words has {len(self.label_words)} entries for {len(labels)} labels "
                f"({', '.join(labels[:10])}); accepted: one word per label"
            )
        self.labels, self.num_labels = labels, len(labels)
        self.label_words = self.label_words or list(labels)
        splits = split_records(kept, key=lambda r: r["text"], **self.split)
        self._records = splits.parts()
        self._tokenizer, self._seed = tokenizer, seed
        self._data = {}
        if getattr(tokenizer, "eos_token_id", None) is not None:  # a causal LM's tokenizer: probe it
            self.forgetting.setup(tokenizer)
        self.stats = {
            **raw.counts(),
            "empty_dropped": n_empty,
            "other_label_dropped": len(records) - len(kept),
            "duplicates_dropped": splits.n_duplicates,
            **splits.sizes(),
        }
        log.info("%s from %s: labels %s, %s", self.name, raw.origin, labels, self.stats)
        if self.formulation != "auto":
            self._encode()

    def head(self, model: torch.nn.Module) -> torch.nn.Module | None:
        """Resolve the formulation from the model; the classifier head on a sequence-classification model
        (it trains beside the method's parameters), None for the verbaliser. Incompatible combinations
        raise ConfigError."""
        found = classifier_head(model)
        kind = type(model).__name__
        if self.formulation == "verbaliser" and not is_causal_lm(model):
            raise ConfigError(
                "task.formulation='verbaliser' needs a causal language model (model.architecture=causal_lm); "
                f"{kind} has no language-model head (use task.formulation=classifier or auto)"
            )
        if self.formulation == "classifier" and found is None:
            raise ConfigError(
                f"task.formulation='classifier' needs a sequence-classification model "
                f"(model.architecture=sequence_classification); {kind} has no classification head "
                "(use task.formulation=verbaliser or auto)"
            )
        if self.formulation == "auto":
            if found is not None:
                self.formulation = "classifier"
            elif is_causal_lm(model):
                self.formulation = "verbaliser"
            else:
                raise ConfigError(
                    f"task={self.name!r} found neither a classification head nor a language-model head in "
                    f"{kind}"
                )
        if self.formulation == "classifier":
            model_labels = getattr(getattr(model, "config", None), "num_labels", None)
            if model_labels is not None and self.num_labels is not None and model_labels != self.num_labels:
                raise ConfigError(
                    f"model.num_labels={model_labels} but task {self.name!r} has {self.num_labels} labels; "
                    f"accepted: model.num_labels={self.num_labels} "
                    "(set task.num_labels: the encoder reads it)"
                )
        if self._records and not self._data:
            self._encode()
        return found if self.formulation == "classifier" else None

    def _encode(self) -> None:
        tokenizer = self._tokenizer
        index = {label: i for i, label in enumerate(self.labels or [])}
        if self.formulation == "classifier":
            for part, rows in self._records.items():
                texts = truncate_texts(tokenizer, [r["text"] for r in rows], self.max_tokens)
                ids = tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else []
                self._data[part] = [
                    LabelledText(list(row_ids), index[r["label"]])
                    for row_ids, r in zip(ids, rows, strict=True)
                ]
            return
        words = self.label_words or []
        word_ids = [list(ids) for ids in tokenizer(words, add_special_tokens=False)["input_ids"]]
        if any(not ids for ids in word_ids):
            raise ConfigError(f"task.label_words={words} contains a word with no tokens")
        first = [ids[0] for ids in word_ids]
        if len(set(first)) != len(first):
            clash = [w for w, f in zip(words, first, strict=True) if first.count(f) > 1]
            raise ConfigError(
                f"task.label_words {clash} start with the same token, so the verbaliser cannot tell them "
                "apart; accepted: label words whose first tokens differ (set task.label_words)"
            )
        self._first_token_ids = torch.tensor(first, dtype=torch.long)
        choices = _choices(words)
        for part, rows in self._records.items():
            texts = truncate_texts(tokenizer, [r["text"] for r in rows], self.max_tokens)
            rendered = [render_prompt(tokenizer, self.prompt.format(text=t, choices=choices)) for t in texts]
            templated = bool(rendered) and rendered[0][1]
            prompts = (
                tokenizer([t for t, _ in rendered], add_special_tokens=not templated)["input_ids"]
                if rows
                else []
            )
            data = []
            for prompt_ids, r in zip(prompts, rows, strict=True):
                label = index[r["label"]]
                data.append(
                    LabelledText([*prompt_ids, *word_ids[label]], label, len(prompt_ids), word_ids[label])
                )
            self._data[part] = data

    def split_sizes(self) -> dict[str, int]:
        """`{"train": n, "val": n, "test": n}` (zeros before `setup`; known before tokenization)."""
        return {part: len(self._records.get(part, [])) for part in ("train", "val", "test")}

    def examples(self, part: str) -> list[LabelledText]:
        """The tokenized examples of `part`: after `setup` and, with `formulation: auto`, `head(model)`."""
        if part in self._records and part not in self._data:
            raise RuntimeError(
                f"{self.name}: formulation is 'auto': call head(model) (or set task.formulation) before "
                f"asking for the {part} loader"
            )
        return super().examples(part)

    def collator(self, train: bool) -> Collate:
        """Right-padded batches with `class_labels` (and the verbaliser's token labels)."""
        verbaliser = self.formulation == "verbaliser"
        return ClassificationCollator(pad_token_id(self._tokenizer), verbaliser=verbaliser)

    # ---- objective and metrics -----------------------------------------------------------------------
    def _forward(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, int, torch.Tensor]:
        """One forward pass -> `(loss, count, predictions)`. Without grad (evaluation) the result for the
        batch just seen is reused: the module calls `loss`, then `evaluate`, on the same batch.

        Classifier: cross-entropy over the examples, argmax of the logits. Verbaliser: cross-entropy over
        the label-word tokens; prediction = argmax over the label words' first-token logits at the last
        prompt position (the output head runs only on those positions)."""
        grad = torch.is_grad_enabled()
        if not grad and self._cache is not None and self._cache[0] is batch:
            return self._cache[1:]
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if "labels" not in batch:
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            targets = batch["class_labels"]
            out = (F.cross_entropy(logits, targets), int(targets.numel()), logits.detach().argmax(-1))
        else:
            if self._first_token_ids is None:
                raise RuntimeError(f"{self.name}: the verbaliser's label words are not tokenized yet")
            shift_labels = batch["labels"][:, 1:]
            labelled = shift_labels != IGNORE_INDEX
            rows = torch.arange(ids.shape[0], device=ids.device)
            answer_at = batch["prompt_lengths"] - 1
            parts = hidden_and_head(model, ids, mask)
            if parts is None:
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                token_logits, answer = logits[:, :-1][labelled].float(), logits[rows, answer_at].float()
            else:
                hidden, head = parts
                token_logits = head(hidden[:, :-1][labelled]).float()
                answer = head(hidden[rows, answer_at]).float()
            n = int(labelled.sum())
            loss = F.cross_entropy(token_logits, shift_labels[labelled], reduction="sum") / max(n, 1)
            first = self._first_token_ids.to(answer.device)
            out = (loss, n, answer.detach()[:, first].argmax(-1))
        self._cache = None if grad else (batch, *out)
        return out

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
        """Classifier: mean cross-entropy over the examples (count = examples). Verbaliser: mean
        cross-entropy over the label-word tokens (count = those tokens)."""
        loss, n, _ = self._forward(model, batch)
        return loss, n

    @torch.no_grad()
    def predict(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """Predicted class indices (B,): the classifier's argmax, or the verbaliser's argmax over the label
        words' first-token logits at the position right after the prompt."""
        return self._forward(model, batch)[2]

    def evaluate(self, model: torch.nn.Module, batch: Batch) -> dict[str, list[Any]]:
        """Per example: `accuracy` (x 100), the true `label` and the `predicted` one (for `aggregate`'s
        macro-F1); `probe_loss` once per pass on causal LMs."""
        truth = batch["class_labels"].tolist()
        predicted = self.predict(model, batch).tolist()
        return {
            "accuracy": accuracy(truth, predicted),
            "label": truth,
            "predicted": predicted,
            **self.forgetting.scores(model, batch),
        }

    def aggregate(self, outputs: Mapping[str, Sequence[Any]]) -> dict[str, float]:
        """Means of the per-example scores, and `macro_f1` (x 100) of the pass's confusion matrix."""
        scores = {k: v for k, v in outputs.items() if k not in ("label", "predicted")}
        metrics = mean_metrics(scores)
        truth, predicted = outputs.get("label", []), outputs.get("predicted", [])
        if truth:
            metrics["macro_f1"] = macro_f1(confusion_matrix(truth, predicted, len(self.labels or [])))
        return metrics


def _choices(words: Sequence[str]) -> str:
    """`a, b or c`."""
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]
