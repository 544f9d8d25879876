"""Supervised instruction tuning (SFT) with the tokenizer's chat template; loss on the response tokens only.

Default data (`dataset: mixture`): an instruction mixture built deterministically from the shipped corpora,
one instruction TYPE per kind of request:
- `headline`  (BBC News): "Write a headline for this news article." -> the article's title (ROUGE-L);
- `sentiment` (Rotten Tomatoes): "Is this movie review positive or negative?" -> `positive`/`negative`
  (exact match);
- `section`   (BBC News): "Which section ... business, entertainment, politics, sports or tech?" -> the
  section (exact match);
- `approach`  (ACLSum): "Summarise the approach of this paper in one sentence." + abstract -> the paper's
  approach summary (ROUGE-L).
BBC articles are divided between `headline` and `section` by content hash, so no article serves two types.
Each type is deduped and split on its own (`splits.py`: content hash, disjoint, `split` counts per type);
the types in `held_out_types` are never trained on (their train part is dropped): their val/test examples
measure whether tuning generalises to instructions it has not seen.

Files: Alpaca-style JSON/JSONL/CSV/Parquet (`instruction`, optional `input`, `output`), or chat format (a
`messages` list of `{role, content}`; the last message must be the assistant's and is the target, the
earlier ones are the prompt). An optional `type_column` gives each example its type (default: one type,
`instruction`).

Metrics, on each val/test example (greedy generation): `accuracy/<type>` (x 100, exact match: the answer
starts with the reference words, case and punctuation ignored) for the label-like types
(`exact_match_types`), `rouge_l/<type>` (F x 100) for the others, and `loss/<type>` (mean response-token
loss). The primary `score` is the mean over all eval examples of their type's score; the eval splits hold
the same number of examples per type, so it is the mean of the per-type scores. `score_seen` /
`score_unseen` split it by trained vs held-out types. The module's `loss` is the held-out response loss.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from peftbench.errors import ConfigError
from peftbench.tasks.base import Batch
from peftbench.tasks.checks import positive_int, require_eos
from peftbench.tasks.collate import CausalLMCollator, Encoded, pad_token_id, render_prompt, truncate_texts
from peftbench.tasks.datatask import Collate, DataTask
from peftbench.tasks.greedy import greedy_answers
from peftbench.tasks.instruction_data import (
    DEFAULT_HELD_OUT,
    FORMATS,
    MIXTURE,
    MIXTURE_TYPES,
    parse_messages,
)
from peftbench.tasks.labels import answer_matches
from peftbench.tasks.logprobs import response_logprobs
from peftbench.tasks.objectives import target_token_loss
from peftbench.tasks.rouge import rouge_scores
from peftbench.tasks.sources import RawData, load_any_source
from peftbench.tasks.splits import content_hash, split_records

log = logging.getLogger(__name__)


@dataclass
class InstructionExample(Encoded):
    """A tokenized example and its instruction type."""

    kind: str = "instruction"


class InstructionCollator(CausalLMCollator):
    """`CausalLMCollator` plus `types` (each example's instruction type)."""

    def __call__(self, examples: Sequence[Encoded]) -> dict[str, Any]:
        """Build the batch dict."""
        batch = super().__call__(examples)
        batch["types"] = [getattr(ex, "kind", "instruction") for ex in examples]
        return batch


def render_messages(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> tuple[str, bool]:
    """The conversation so far, ready for the assistant's reply; (text, chat-templated)."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return render_prompt(tokenizer, messages[0]["content"])
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        return text, True
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n\n".join(lines) + "\n\nAssistant:\n", False


def _label_types(kind_names: Sequence[str]) -> list[str]:
    return [k for k in kind_names if k in MIXTURE_TYPES and MIXTURE_TYPES[k].label_like]


@dataclass(kw_only=True, eq=False)
class InstructionTask(DataTask):
    """SFT on instruction -> response examples (see the module doc).

    Args (besides `DataTask`'s: name, dataset, data_files, subset, hf_split, split, eval_batch_size, probe;
    here `dataset: mixture` is the default, and `split` applies PER TYPE, `max_train` capping each type):
        format: `auto` (messages when the data has `messages_column`, else Alpaca), `alpaca`, `messages`.
        instruction_column, input_column, output_column: Alpaca columns (`input` may be absent or empty).
        messages_column: the chat-format column.
        type_column: a column naming each example's instruction type (files; null: one type).
        types: the mixture's types to use (null: all of `MIXTURE_TYPES`).
        held_out_types: types never trained on, only evaluated. null: `DEFAULT_HELD_OUT` for the mixture
            (those of its types in use, when others remain), none for files; `[]`: none. After `setup`
            it holds the types actually held out.
        exact_match_types: types scored by exact match (null: the mixture's label-like types).
        max_source_tokens: the text an instruction is about (article, review, abstract, Alpaca `input`) is
            cut to this many tokens.
        max_prompt_tokens: chat-format prompts longer than this are dropped (counted).
        max_target_tokens: the response is cut to this many tokens, EOS included.
        max_new_tokens: generation budget for ROUGE-scored types.
        label_new_tokens: generation budget for exact-match types.
    """

    primary_metric: ClassVar[str] = "score"
    default_split: ClassVar[dict[str, Any]] = {"val": 8, "test": 32, "max_train": 1000}

    name: str = "instruction"
    dataset: str = MIXTURE
    format: str = "auto"
    instruction_column: str = "instruction"
    input_column: str = "input"
    output_column: str = "output"
    messages_column: str = "messages"
    type_column: str | None = None
    types: Sequence[str] | None = None
    held_out_types: Sequence[str] | None = None
    exact_match_types: Sequence[str] | None = None
    max_source_tokens: int = 160
    max_prompt_tokens: int = 512
    max_target_tokens: int = 48
    max_new_tokens: int = 32
    label_new_tokens: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.format not in FORMATS:
            raise ConfigError(f"task.format={self.format!r} is not valid; accepted: {', '.join(FORMATS)}")
        self.columns = {
            "instruction": self.instruction_column,
            "input": self.input_column,
            "output": self.output_column,
            "messages": self.messages_column,
        }
        self.types = list(self.types) if self.types is not None else list(MIXTURE_TYPES)
        unknown = [t for t in self.types if t not in MIXTURE_TYPES]
        if unknown or not self.types:
            raise ConfigError(
                f"task.types={list(self.types)} is not valid; accepted: a non-empty list of "
                f"{', '.join(MIXTURE_TYPES)}"
            )
        self.requested_held_out = None if self.held_out_types is None else list(self.held_out_types)
        self.held_out_types = []  # resolved in `setup`
        self.exact_match_types = None if self.exact_match_types is None else list(self.exact_match_types)
        for key in ("max_source_tokens", "max_prompt_tokens", "max_target_tokens", "max_new_tokens"):
            positive_int(key, getattr(self, key))
        positive_int("label_new_tokens", self.label_new_tokens)
        self.exact_types: set[str] = set()
        self._cache: tuple[Any, torch.Tensor, torch.Tensor] | None = None

    # ---- data: records {type, prompt (user text or a JSON list of messages), target} -------------------
    def _truncate(self, texts: Sequence[str]) -> list[str]:
        return truncate_texts(self._tokenizer, list(texts), self.max_source_tokens)

    def _mixture(self) -> tuple[list[dict[str, str]], dict[str, int]]:
        """The default mixture's records `{type, source, target}` (prompts are filled after the split)."""
        corpora: dict[str, RawData] = {}
        records: list[dict[str, str]] = []
        both = {"headline", "section"}
        split_bbc = both if both <= set(self.types) else set()
        for kind in self.types:
            spec = MIXTURE_TYPES[kind]
            if spec.corpus not in corpora:
                corpora[spec.corpus] = load_any_source(spec.corpus)
            answers = dict(spec.answers)
            for r in corpora[spec.corpus].records:
                source, target = str(r.get(spec.source) or "").strip(), str(r.get(spec.target) or "").strip()
                if not source or not target:
                    continue
                # one BBC article serves one type only: headline (even hash) or section (odd hash)
                if kind in split_bbc and int(content_hash(source), 16) % 2 != (kind == "section"):
                    continue
                records.append({"type": kind, "source": source, "target": answers.get(target, target)})
        stats = {f"{name}_records": len(raw.records) for name, raw in corpora.items()}
        return records, stats

    def _from_file(self) -> tuple[list[dict[str, str]], dict[str, int]]:
        """Alpaca or chat-format records from a local file or an HF dataset."""
        raw = self.read_source()
        cols = self.columns
        fmt = self.format
        if fmt == "auto":
            if cols["messages"] in raw.columns:
                fmt = "messages"
            elif cols["instruction"] in raw.columns and cols["output"] in raw.columns:
                fmt = "alpaca"
            else:
                raise ConfigError(
                    f"{raw.origin} has neither a {cols['messages']!r} column (chat format) nor "
                    f"{cols['instruction']!r} and {cols['output']!r} columns (Alpaca format); columns: "
                    f"{', '.join(raw.columns)}; set task.messages_column or task.instruction_column / "
                    "task.output_column"
                )
        needed = [cols["messages"]] if fmt == "messages" else [cols["instruction"], cols["output"]]
        if self.type_column:
            needed.append(self.type_column)
        for column in needed:
            if column not in raw.columns:
                key = next((f"{k}_column" for k, v in cols.items() if v == column), "type_column")
                raise ConfigError(
                    f"task.{key}={column!r} is not a column of {raw.origin}; "
                    f"accepted: {', '.join(raw.columns)}"
                )
        records: list[dict[str, str]] = []
        dropped = 0
        if fmt == "alpaca":
            inputs = self._truncate([str(r.get(cols["input"]) or "").strip() for r in raw.records])
            for r, text in zip(raw.records, inputs, strict=True):
                instruction = str(r.get(cols["instruction"]) or "").strip()
                output = str(r.get(cols["output"]) or "").strip()
                if not instruction or not output:
                    dropped += 1
                    continue
                prompt = f"{instruction}\n\n{text}" if text else instruction
                records.append({"type": self._type_of(r), "prompt": prompt, "target": output})
        else:
            for r in raw.records:
                messages = parse_messages(r.get(cols["messages"]))
                if messages is None:
                    dropped += 1
                    continue
                records.append(
                    {
                        "type": self._type_of(r),
                        "prompt": json.dumps(messages[:-1], ensure_ascii=False),
                        "target": messages[-1]["content"],
                        "chat": "1",
                    }
                )
        return records, {**raw.counts(), "malformed_dropped": dropped}

    def _type_of(self, record: Mapping[str, Any]) -> str:
        if not self.type_column:
            return "instruction"
        return str(record.get(self.type_column) or "").strip() or "instruction"

    def setup(self, tokenizer: Any, seed: int) -> None:
        """Build or load the records, split each type, drop held-out types' train parts, tokenize."""
        require_eos(tokenizer, self.name)
        self._tokenizer, self._seed = tokenizer, seed
        mixture = self.dataset == MIXTURE and not self.data_files
        records, stats = self._mixture() if mixture else self._from_file()
        order = list(MIXTURE_TYPES)
        kinds = sorted(
            {r["type"] for r in records}, key=lambda k: (order.index(k) if k in order else len(order), k)
        )
        if self.requested_held_out is not None:
            self.held_out_types = self.requested_held_out
        elif mixture:
            self.held_out_types = [t for t in DEFAULT_HELD_OUT if t in kinds and len(kinds) > 1]
        missing = [t for t in self.held_out_types if t not in kinds]
        if missing:
            raise ConfigError(
                f"task.held_out_types={self.held_out_types} names type(s) {missing} that the data does not "
                f"have; accepted: types among {', '.join(kinds)}"
            )
        if set(kinds) <= set(self.held_out_types):
            raise ConfigError(
                f"task.held_out_types={self.held_out_types} holds out every type; accepted: leave at least "
                "one type to train on"
            )
        if self.exact_match_types is None:
            self.exact_types = set(_label_types(kinds)) if mixture else set()
        else:
            self.exact_types = set(self.exact_match_types)
        parts: dict[str, list[dict[str, str]]] = {"train": [], "val": [], "test": []}
        n_dup = held_out_dropped = 0
        for kind in kinds:
            rows = [r for r in records if r["type"] == kind]
            splits = split_records(rows, key=lambda r: r.get("source") or r["prompt"], **self.split)
            n_dup += splits.n_duplicates
            if kind in self.held_out_types:
                held_out_dropped += len(splits.train)
            else:
                parts["train"] += splits.train
            parts["val"] += splits.val
            parts["test"] += splits.test
        for part, rows in parts.items():
            self._data[part] = self._encode(self._fill_prompts(rows) if mixture else rows)
        too_long = sum(len(rows) - len(self._data[p]) for p, rows in parts.items())
        self.forgetting.setup(tokenizer)
        self.stats = {
            **stats,
            "types": len(kinds),
            "duplicates_dropped": n_dup,
            "held_out_train_dropped": held_out_dropped,
            "too_long_dropped": too_long,
            **self.split_sizes(),
        }
        log.info("%s: types %s (held out: %s), %s", self.name, kinds, self.held_out_types, self.stats)

    def _fill_prompts(self, rows: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
        """Mixture rows -> `{type, prompt, target}`: the type's prompt around the truncated source."""
        sources = self._truncate([r["source"] for r in rows])
        return [
            {
                "type": r["type"],
                "prompt": MIXTURE_TYPES[r["type"]].prompt.format(source=s),
                "target": r["target"],
            }
            for r, s in zip(rows, sources, strict=True)
        ]

    def _encode(self, rows: Sequence[Mapping[str, str]]) -> list[InstructionExample]:
        """Chat-template the prompts, tokenize; target = response (cut) + EOS."""
        tokenizer = self._tokenizer
        if not rows:
            return []
        rendered = [
            render_messages(tokenizer, json.loads(r["prompt"]))
            if r.get("chat")
            else render_prompt(tokenizer, r["prompt"])
            for r in rows
        ]
        prompts = [
            tokenizer(text, add_special_tokens=not templated)["input_ids"] for text, templated in rendered
        ]
        targets = tokenizer([r["target"] for r in rows], add_special_tokens=False)["input_ids"]
        eos = tokenizer.eos_token_id
        return [
            InstructionExample(list(p), [*t[: self.max_target_tokens - 1], eos], r["target"], r["type"])
            for p, t, r in zip(prompts, targets, rows, strict=True)
            if len(p) <= self.max_prompt_tokens
        ]

    def collator(self, train: bool) -> Collate:
        """Right-padded batches with each example's type; evaluation batches also carry the left-padded
        prompts and references (grouped by type: the eval splits are built type by type)."""
        return InstructionCollator(pad_token_id(self._tokenizer), for_generation=not train)

    # ---- objective and metrics -----------------------------------------------------------------------
    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
        """Mean cross-entropy over response tokens (prompt masked), and the number of response tokens.

        In evaluation (no grad) it is computed from per-example sums that `evaluate` reuses for
        `loss/<type>` (the module calls `loss`, then `evaluate`, on the same batch)."""
        if torch.is_grad_enabled():
            return target_token_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        logps, counts = self._example_logprobs(model, batch)
        n = int(counts.sum())
        return -logps.sum() / max(n, 1), n

    def _example_logprobs(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example summed response log-probs and token counts; cached for the batch just seen."""
        if self._cache is not None and self._cache[0] is batch:
            return self._cache[1], self._cache[2]
        with torch.no_grad():
            logps, counts = response_logprobs(
                model, batch["input_ids"], batch["attention_mask"], batch["labels"]
            )
        self._cache = (batch, logps, counts)
        return logps, counts

    def generate(self, model: Any, batch: Batch) -> list[str]:
        """Greedy answers for the batch's left-padded prompts: new tokens only, stripped. The budget is
        `label_new_tokens` when every example is exact-match scored, else `max_new_tokens`."""
        exact = all(kind in self.exact_types for kind in batch["types"])
        budget = self.label_new_tokens if exact else self.max_new_tokens
        return greedy_answers(model, self._tokenizer, batch, budget)

    def evaluate(self, model: torch.nn.Module, batch: Batch) -> dict[str, list[float]]:
        """Per example: its type's score (`accuracy/<type>` or `rouge_l/<type>`), `loss/<type>`, and the
        overall `score`, `score_seen` / `score_unseen`; `probe_loss` once per pass."""
        logps, counts = self._example_logprobs(model, batch)
        predictions = self.generate(model, batch)
        losses = (-logps / counts.clamp(min=1)).tolist()
        out: dict[str, list[float]] = {"score": []}
        for i, (kind, prediction, reference) in enumerate(
            zip(batch["types"], predictions, batch["references"], strict=True)
        ):
            if kind in self.exact_types:
                key, value = f"accuracy/{kind}", 100.0 * answer_matches(prediction, reference)
            else:
                first_line = (prediction.splitlines() or [""])[0].strip()
                key, value = f"rouge_l/{kind}", rouge_scores([first_line], [reference])["rouge_l"][0]
            seen = "score_unseen" if kind in self.held_out_types else "score_seen"
            for name, v in ((key, value), ("score", value), (seen, value), (f"loss/{kind}", losses[i])):
                out.setdefault(name, []).append(v)
        return out | self.forgetting.scores(model, batch)
