"""Label metrics: accuracy (per example), macro-F1 (of the whole evaluation pass), answer matching.

Accuracy is a mean over examples. Macro-F1 is not: it is a function of the pass's confusion matrix, so the
classification task returns each example's true and predicted label from `evaluate` and computes macro-F1
in `aggregate` (`base.py`), from everything the pass saw (also when `limit_val_batches` cuts it short).
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

import torch


def macro_f1(confusion: torch.Tensor) -> float:
    """Macro-averaged F1 x 100 from a `(num_labels, num_labels)` confusion matrix (rows: truth, cols: pred).

    Labels that never occur and are never predicted are left out of the average (as scikit-learn's
    `labels=` default does for the labels present); F1 of a label with tp = 0 is 0.
    """
    tp = confusion.diag().double()
    fp = confusion.sum(dim=0).double() - tp
    fn = confusion.sum(dim=1).double() - tp
    present = (tp + fp + fn) > 0
    if not bool(present.any()):
        return 0.0
    f1 = torch.where(present, 2 * tp / (2 * tp + fp + fn).clamp(min=1), torch.zeros_like(tp))
    return float(100.0 * f1[present].mean())


def confusion_matrix(truth: Sequence[int], predicted: Sequence[int], num_labels: int) -> torch.Tensor:
    """`(num_labels, num_labels)` counts: rows the true label, columns the predicted one."""
    confusion = torch.zeros(num_labels, num_labels, dtype=torch.long)
    for t, p in zip(truth, predicted, strict=True):
        confusion[int(t), int(p)] += 1
    return confusion


def accuracy(truth: Sequence[int], predicted: Sequence[int]) -> list[float]:
    """Per-example accuracy x 100 (100 for a correct prediction, 0 otherwise)."""
    return [100.0 * (int(t) == int(p)) for t, p in zip(truth, predicted, strict=True)]


_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalise_answer(text: str) -> list[str]:
    """Words of an answer, lower case, punctuation removed (first line only)."""
    first = (text.strip().splitlines() or [""])[0]
    return _PUNCT.sub(" ", first.lower()).split()


def answer_matches(prediction: str, reference: str) -> bool:
    """Exact match for label-like answers: the prediction's first words are the reference's words
    (case and punctuation ignored), so `"Positive."` and `"positive, clearly"` match `"positive"`."""
    ref = normalise_answer(reference)
    return bool(ref) and normalise_answer(prediction)[: len(ref)] == ref
