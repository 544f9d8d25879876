"""Forgetting probe: the causal-LM loss on held-out general text, reported by every task as `probe_loss`.

The text is a fixed slice of ACLSum paper introductions (no task trains on them: the instruction mixture
uses abstracts and approach summaries only): the first `texts` papers in content-hash order, each cut to
`max_tokens` tokens. The loss is the token-weighted mean next-token cross-entropy over all of them.

A task calls `probe.scores(model, batch)` inside `evaluate`; on the first batch of an evaluation pass
(`batch[PASS_START]`, set by `common.MarkPassStart`) it returns `{"probe_loss": [loss]}`, on every other
batch nothing, so the module's average of the one value is the probe loss of that pass:
`test_before/probe_loss` vs `test/probe_loss` is the forgetting. Models without an LM head (encoders)
report no probe.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

import torch

from peftbench.errors import ConfigError, check_int
from peftbench.tasks.collate import IGNORE_INDEX, pad_token_id, truncate_texts
from peftbench.tasks.heads import is_causal_lm
from peftbench.tasks.loaders import PASS_START
from peftbench.tasks.objectives import target_token_loss
from peftbench.tasks.splits import content_hash

log = logging.getLogger(__name__)

PROBE_DEFAULTS: dict[str, int] = {"texts": 16, "max_tokens": 128, "batch_size": 8}


def _detokenise(text: str) -> str:
    """Undo ACLSum's whitespace tokenisation for punctuation (`word , word ( QA )` -> `word, word (QA)`)."""
    text = re.sub(r" ([,.;:!?%)\]])", r"\1", text)
    return re.sub(r"([(\[]) ", r"\1", text)


def probe_texts(n: int) -> list[str]:
    """The probe's text: `n` ACLSum introductions, chosen by content hash (stable across machines)."""
    from peftbench.tasks.sources import aclsum_records

    intros = {r["introduction"] for r in aclsum_records().records if r["introduction"].strip()}
    return [_detokenise(t) for t in sorted(intros, key=content_hash)[:n]]


class ForgettingProbe:
    """Loss on held-out general text (see the module doc).

    Args:
        spec: `None` / `False` disables the probe; `True` or a mapping with any of `texts` (number of
            passages, default 16), `max_tokens` (per passage, default 128), `batch_size` (default 8).
    """

    def __init__(self, spec: Mapping[str, Any] | bool | None = True) -> None:
        self.enabled = bool(spec)
        values = dict(PROBE_DEFAULTS)
        if isinstance(spec, Mapping):
            unknown = sorted(set(spec) - set(PROBE_DEFAULTS))
            if unknown:
                raise ConfigError(
                    f"task.probe has unknown key(s) {', '.join(map(str, unknown))}; "
                    f"accepted: {', '.join(PROBE_DEFAULTS)} (or probe: null to disable it)"
                )
            values.update(spec)
        elif not isinstance(spec, bool | None):
            raise ConfigError(f"task.probe={spec!r} is not valid; accepted: null, true or a mapping")
        for key, value in values.items():
            check_int(f"task.probe.{key}", value)
        self.n_texts, self.max_tokens, self.batch_size = (
            values["texts"],
            values["max_tokens"],
            values["batch_size"],
        )
        self._batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def setup(self, tokenizer: Any) -> None:
        """Tokenize the probe text (plain text, the tokenizer's usual special tokens)."""
        if not self.enabled:
            return
        texts = truncate_texts(tokenizer, probe_texts(self.n_texts), self.max_tokens)
        pad = pad_token_id(tokenizer)
        self._batches = []
        for start in range(0, len(texts), self.batch_size):
            rows = tokenizer(texts[start : start + self.batch_size], add_special_tokens=True)["input_ids"]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, row in enumerate(rows):
                ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
                mask[i, : len(row)] = 1
            self._batches.append((ids, mask, ids.masked_fill(mask == 0, IGNORE_INDEX)))

    @torch.no_grad()
    def loss(self, model: torch.nn.Module) -> float | None:
        """Token-weighted mean next-token loss on the probe text; None when disabled or not a causal LM."""
        if not (self.enabled and self._batches and is_causal_lm(model)):
            return None
        device = next(model.parameters()).device
        total, tokens = 0.0, 0
        for ids, mask, labels in self._batches:
            loss, n = target_token_loss(model, ids.to(device), mask.to(device), labels.to(device))
            total += float(loss) * n
            tokens += n
        return total / max(tokens, 1)

    def scores(self, model: torch.nn.Module, batch: Any) -> dict[str, list[float]]:
        """`{"probe_loss": [loss]}` on the first batch of an evaluation pass, else `{}`."""
        if not batch.get(PASS_START):
            return {}
        value = self.loss(model)
        return {} if value is None else {"probe_loss": [value]}
