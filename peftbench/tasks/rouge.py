"""ROUGE via `rouge_score` directly (`evaluate.load("rouge")` needs the hub).

Per-example F-measures x 100 under the keys `rouge1`, `rouge2`, `rouge_l` (ROUGE-L is the sentence-level
`rougeL`, with the Porter stemmer, as in most headline/summary papers).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from rouge_score import rouge_scorer

ROUGE_KEYS: dict[str, str] = {"rouge1": "rouge1", "rouge2": "rouge2", "rougeL": "rouge_l"}


@lru_cache(maxsize=1)
def _scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, list[float]]:
    """Per-example ROUGE-1/2/L F-measures in [0, 100]; `predictions[i]` is scored against `references[i]`."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    out: dict[str, list[float]] = {name: [] for name in ROUGE_KEYS.values()}
    scorer = _scorer()
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score(reference, prediction)  # (target, prediction)
        for key, name in ROUGE_KEYS.items():
            out[name].append(100.0 * scores[key].fmeasure)
    return out
