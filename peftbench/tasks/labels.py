"""Label metrics: accuracy, a corpus macro-F1 that fits the per-example metric protocol, answer matching.

The module averages whatever per-example lists `evaluate` returns. Accuracy is a mean over examples; macro-F1
is not (it is a function of the whole confusion matrix). `RunningMacroF1` bridges this: it accumulates the
confusion matrix over an evaluation pass and emits, for each batch, values whose running mean equals the
macro-F1 of everything seen so far. The module's final average is therefore exactly the corpus macro-F1
of the pass (also when `limit_val_batches` cuts the pass short). The individual values are increments,
not per-example scores; only their mean is meaningful. It needs batches in a fixed order, one process.
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


class RunningMacroF1:
    """Corpus macro-F1 over an evaluation pass, delivered as per-example increments (see the module doc)."""

    def __init__(self, num_labels: int) -> None:
        self.num_labels = num_labels
        self.reset()

    def reset(self) -> None:
        """Start a new evaluation pass."""
        self.confusion = torch.zeros(self.num_labels, self.num_labels, dtype=torch.long)
        self.seen = 0
        self.value = 0.0

    def update(self, truth: Sequence[int], predicted: Sequence[int]) -> list[float]:
        """Add a batch; returns `len(truth)` equal values such that the mean of all values returned since
        `reset()` equals the macro-F1 (x 100) of all pairs added since `reset()`."""
        n = len(truth)
        if n == 0:
            return []
        for t, p in zip(truth, predicted, strict=True):
            self.confusion[int(t), int(p)] += 1
        before = self.seen * self.value
        self.seen += n
        self.value = macro_f1(self.confusion)
        return [(self.seen * self.value - before) / n] * n


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
