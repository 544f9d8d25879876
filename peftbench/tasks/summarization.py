"""Summarization as conditional generation with a causal LM (default: BBC article -> headline).

Objective: token cross-entropy on the target tokens only. Metric: ROUGE-1/2/L F x 100 of greedy
generations against the references (`rouge_l` is the primary metric).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader

from peftbench.errors import ConfigError
from peftbench.tasks.base import Batch
from peftbench.tasks.collate import CausalLMCollator, Encoded, encode_examples, pad_token_id
from peftbench.tasks.common import MarkPassStart
from peftbench.tasks.objectives import target_token_loss
from peftbench.tasks.probe import ForgettingProbe
from peftbench.tasks.rouge import rouge_scores
from peftbench.tasks.sampler import ResumableSampler
from peftbench.tasks.sources import BBC_NEWS, load_source, map_columns
from peftbench.tasks.splits import check_split_spec, split_records

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "Write a headline for this news article.\n\n{source}"


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"task.{name}={value!r} is not valid; accepted: an integer >= 1")
    return value


class SummarizationTask:
    """Headline / summary generation: `source_column` -> `target_column`.

    Args:
        dataset: `bbc_news` (embedded), a Hugging Face dataset id, or a local dataset directory.
        data_files: a local JSON/JSONL/CSV/TSV/Parquet file; when set it wins over `dataset`.
        subset, hf_split: HF config name and the one split to read (it is re-split here).
        source_column, target_column: the input text and the reference summary.
        max_source_tokens: the source is cut to this many tokens before templating.
        max_target_tokens: the reference is cut to this many tokens, EOS included.
        max_new_tokens: the greedy generation budget at evaluation.
        split: `{val, test}` counts or fractions (the rest is train) and `max_train` (cap, or null).
        eval_batch_size: batch size for val/test (overrides the caller's when set).
        prompt: the user prompt; `{source}` is replaced by the (truncated) source.
        probe: the forgetting probe (`probe.py`, reported as `probe_loss`); null disables it.
    """

    primary_metric = "rouge_l"

    def __init__(
        self,
        name: str = "summarization",
        dataset: str = BBC_NEWS,
        data_files: str | None = None,
        subset: str | None = None,
        hf_split: str = "train",
        source_column: str = "text",
        target_column: str = "title",
        max_source_tokens: int = 192,
        max_target_tokens: int = 32,
        max_new_tokens: int = 24,
        split: Mapping[str, Any] | None = None,
        eval_batch_size: int | None = 16,
        prompt: str = DEFAULT_PROMPT,
        probe: Mapping[str, Any] | bool | None = True,
    ) -> None:
        self.name = name
        self.dataset, self.data_files, self.subset, self.hf_split = dataset, data_files, subset, hf_split
        self.source_column, self.target_column = source_column, target_column
        self.max_source_tokens = _positive("max_source_tokens", max_source_tokens)
        self.max_target_tokens = _positive("max_target_tokens", max_target_tokens)
        self.max_new_tokens = _positive("max_new_tokens", max_new_tokens)
        self.eval_batch_size = (
            None if eval_batch_size is None else _positive("eval_batch_size", eval_batch_size)
        )
        self.split = check_split_spec(split if split is not None else {"val": 64, "test": 128})
        if "{source}" not in prompt:
            raise ConfigError(
                f"task.prompt={prompt!r} is not valid; accepted: a template containing {{source}}"
            )
        try:
            prompt.format(source="")
        except (KeyError, IndexError, ValueError) as error:
            raise ConfigError(
                f"task.prompt={prompt!r} is not valid ({error!r}); accepted: a template whose only field is "
                "{source} (write literal braces as {{ }})"
            ) from None
        self.prompt = prompt
        self.probe = ForgettingProbe(probe)  # forgetting probe (`probe.py`): `probe_loss` once per eval pass
        self.stats: dict[str, int] = {}
        self._data: dict[str, list[Encoded]] = {}
        self._tokenizer: Any = None
        self._seed = 0

    # ---- data -----------------------------------------------------------------------------------------
    def setup(self, tokenizer: Any, seed: int) -> None:
        """Load, map columns, dedupe, split and tokenize. Bad data raises ConfigError here."""
        raw = load_source(self.dataset, self.data_files, self.subset, self.hf_split)
        records, n_empty = map_columns(raw, {"source": self.source_column, "target": self.target_column})
        if not records:
            raise ConfigError(
                f"{raw.origin} has no records with a non-empty {self.source_column!r} "
                f"and {self.target_column!r}"
            )
        splits = split_records(records, key=lambda r: r["source"], **self.split)
        self._tokenizer, self._seed = tokenizer, seed
        for part, rows in (("train", splits.train), ("val", splits.val), ("test", splits.test)):
            self._data[part] = encode_examples(
                tokenizer,
                self.prompt,
                [r["source"] for r in rows],
                [r["target"] for r in rows],
                self.max_source_tokens,
                self.max_target_tokens,
            )
        self.stats = {
            "records_read": len(raw.records),
            **{f"source_{k}": v for k, v in raw.stats.items()},
            "empty_dropped": n_empty,
            "duplicates_dropped": splits.n_duplicates,
            **self.split_sizes(),
        }
        log.info("%s from %s: %s", self.name, raw.origin, self.stats)
        self.probe.setup(tokenizer)

    def head(self, model: torch.nn.Module) -> None:
        """Summarization trains no head of its own (the LM head generates)."""
        return None

    def use_reference(self, reference: Any) -> None:
        """Summarization's objective needs no reference model."""

    def split_sizes(self) -> dict[str, int]:
        """`{"train": n, "val": n, "test": n}` (zeros before `setup`)."""
        return {part: len(self._data.get(part, [])) for part in ("train", "val", "test")}

    def _loader(self, part: str, batch_size: int, shuffle: bool) -> DataLoader:
        if part not in self._data:
            raise RuntimeError(
                f"{self.name}: call setup(tokenizer, seed) before asking for the {part} loader"
            )
        # training order from (seed, epoch): resumable mid-epoch, sharded under DDP (`sampler.py`); every
        # loader gets its own generator so making an iterator never draws from the global RNG
        sampler = ResumableSampler(len(self._data[part]), seed=self._seed) if shuffle else None
        generator = torch.Generator().manual_seed(self._seed)
        collate = CausalLMCollator(pad_token_id(self._tokenizer), for_generation=not shuffle)
        collate = collate if shuffle else MarkPassStart(collate, self._data[part])  # type: ignore[assignment]
        return DataLoader(
            self._data[part],  # type: ignore[arg-type]
            batch_size=batch_size,
            sampler=sampler,
            generator=generator,
            collate_fn=collate,
        )

    def train_dataloader(self, batch_size: int) -> DataLoader:
        """Right-padded training batches, shuffled by a generator seeded with `setup`'s seed."""
        return self._loader("train", batch_size, shuffle=True)

    def val_dataloader(self, batch_size: int) -> DataLoader:
        """Validation batches (with generation inputs), batch size `eval_batch_size` when set."""
        return self._loader("val", self.eval_batch_size or batch_size, shuffle=False)

    def test_dataloader(self, batch_size: int) -> DataLoader:
        """Test batches (with generation inputs), batch size `eval_batch_size` when set."""
        return self._loader("test", self.eval_batch_size or batch_size, shuffle=False)

    # ---- objective and metrics -----------------------------------------------------------------------
    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
        """Mean cross-entropy over target tokens (labels != -100), and the number of target tokens."""
        return target_token_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])

    @torch.no_grad()
    def generate(self, model: Any, batch: Batch) -> list[str]:
        """Greedy generations for the batch's left-padded prompts: new tokens only, first line, stripped."""
        prompt_ids = batch["gen_input_ids"]
        output = model.generate(
            input_ids=prompt_ids,
            attention_mask=batch["gen_attention_mask"],
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            pad_token_id=pad_token_id(self._tokenizer),
            eos_token_id=self._tokenizer.eos_token_id,
        )
        texts = self._tokenizer.batch_decode(output[:, prompt_ids.shape[1] :], skip_special_tokens=True)
        return [(text.strip().splitlines() or [""])[0].strip() for text in texts]

    def evaluate(self, model: torch.nn.Module, batch: Batch) -> dict[str, list[float]]:
        """Per-example ROUGE-1/2/L (F x 100) of greedy generations against `batch["references"]`."""
        scores = rouge_scores(self.generate(model, batch), batch["references"])
        return scores | self.probe.scores(model, batch)  # + `probe_loss` on the first batch of a pass
