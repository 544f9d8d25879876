"""Summarization as conditional generation with a causal LM (default: BBC article -> headline).

Objective: token cross-entropy on the target tokens only. Metric: ROUGE-1/2/L F x 100 of greedy
generations against the references (`rouge_l` is the primary metric).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from peftbench.errors import ConfigError
from peftbench.tasks.base import Batch
from peftbench.tasks.checks import check_template, positive_int, require_eos
from peftbench.tasks.collate import CausalLMCollator, encode_examples, pad_token_id
from peftbench.tasks.datatask import Collate, DataTask
from peftbench.tasks.greedy import greedy_answers
from peftbench.tasks.objectives import target_token_loss
from peftbench.tasks.rouge import rouge_scores
from peftbench.tasks.sources import map_columns
from peftbench.tasks.splits import split_records

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "Write a headline for this news article.\n\n{source}"


@dataclass(kw_only=True, eq=False)
class SummarizationTask(DataTask):
    """Headline / summary generation: `source_column` -> `target_column`.

    Args (besides `DataTask`'s: name, dataset, data_files, subset, hf_split, split, eval_batch_size, probe):
        source_column, target_column: the input text and the reference summary.
        max_source_tokens: the source is cut to this many tokens before templating.
        max_target_tokens: the reference is cut to this many tokens, EOS included.
        max_new_tokens: the greedy generation budget at evaluation.
        prompt: the user prompt; `{source}` is replaced by the (truncated) source.
    """

    primary_metric: ClassVar[str] = "rouge_l"
    default_split: ClassVar[dict[str, Any]] = {"val": 64, "test": 128}

    name: str = "summarization"
    source_column: str = "text"
    target_column: str = "title"
    max_source_tokens: int = 192
    max_target_tokens: int = 32
    max_new_tokens: int = 24
    prompt: str = DEFAULT_PROMPT

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("max_source_tokens", "max_target_tokens", "max_new_tokens"):
            positive_int(key, getattr(self, key))
        check_template(self.prompt, "source", ["source"])

    # ---- data -----------------------------------------------------------------------------------------
    def setup(self, tokenizer: Any, seed: int) -> None:
        """Load, map columns, dedupe, split and tokenize. Bad data raises ConfigError here."""
        require_eos(tokenizer, self.name)
        raw = self.read_source()
        records, n_empty = map_columns(raw, {"source": self.source_column, "target": self.target_column})
        if not records:
            raise ConfigError(
                f"{raw.origin} has no records with a non-empty {self.source_column!r} "
                f"and {self.target_column!r}"
            )
        splits = split_records(records, key=lambda r: r["source"], **self.split)
        self._tokenizer, self._seed = tokenizer, seed
        for part, rows in splits.parts().items():
            self._data[part] = encode_examples(
                tokenizer,
                self.prompt,
                [r["source"] for r in rows],
                [r["target"] for r in rows],
                self.max_source_tokens,
                self.max_target_tokens,
            )
        self.stats = {
            **raw.counts(),
            "empty_dropped": n_empty,
            "duplicates_dropped": splits.n_duplicates,
            **self.split_sizes(),
        }
        log.info("%s from %s: %s", self.name, raw.origin, self.stats)
        self.forgetting.setup(tokenizer)

    def collator(self, train: bool) -> Collate:
        """Right-padded batches; evaluation batches also carry the left-padded prompts and references."""
        return CausalLMCollator(pad_token_id(self._tokenizer), for_generation=not train)

    # ---- objective and metrics -----------------------------------------------------------------------
    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
        """Mean cross-entropy over target tokens (labels != -100), and the number of target tokens."""
        return target_token_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])

    def generate(self, model: Any, batch: Batch) -> list[str]:
        """Greedy generations for the batch's left-padded prompts: new tokens only, first line, stripped."""
        texts = greedy_answers(model, self._tokenizer, batch, self.max_new_tokens)
        return [(text.splitlines() or [""])[0].strip() for text in texts]

    def evaluate(self, model: torch.nn.Module, batch: Batch) -> dict[str, list[float]]:
        """Per-example ROUGE-1/2/L (F x 100) of greedy generations against `batch["references"]`."""
        scores = rouge_scores(self.generate(model, batch), batch["references"])
        return scores | self.forgetting.scores(model, batch)  # + `probe_loss` on the first batch of a pass
