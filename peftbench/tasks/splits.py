"""Dedupe, then a deterministic, disjoint train/val/test split that depends on content only.

Every record gets a key: the SHA-1 of its normalised source text (lower case, whitespace collapsed).
Records with equal keys are duplicates; one survivor is kept, chosen by the hash of its full content so
the choice does not depend on file order. Survivors are sorted by key (a pseudo-random but stable order)
and cut: the first `test` go to test, the next `val` to val, the rest to train. The seed and the order of
the input never change which split a record lands in, and asking for a larger val set never moves a
record out of test.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from peftbench.errors import ConfigError, is_number

T = TypeVar("T", bound=Mapping[str, Any])

SPLIT_KEYS = ("val", "test", "max_train")


def normalise(text: str) -> str:
    """Lower case with runs of whitespace collapsed to one space."""
    return " ".join(text.lower().split())


def content_hash(text: str) -> str:
    """SHA-1 hex digest of the normalised text: a key that is stable across runs and machines."""
    return hashlib.sha1(normalise(text).encode("utf-8")).hexdigest()


def _record_hash(record: Mapping[str, Any]) -> str:
    """SHA-1 of a whole record (sorted keys): the tie-breaker among duplicates."""
    return hashlib.sha1(json.dumps(record, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def dedupe(records: Sequence[T], key: Callable[[T], str]) -> tuple[list[tuple[str, T]], int]:
    """Drop records whose `key` text normalises to the same hash.

    Returns `(survivors, n_dropped)` with survivors as `(hash, record)` sorted by hash. Among duplicates
    the record with the smallest full-content hash survives, so the result is independent of input order.
    """
    best: dict[str, tuple[str, T]] = {}
    for record in records:
        digest = content_hash(key(record))
        tie = _record_hash(record)
        if digest not in best or tie < best[digest][0]:
            best[digest] = (tie, record)
    survivors = sorted((digest, record) for digest, (_, record) in best.items())
    return survivors, len(records) - len(survivors)


def _count(name: str, value: int | float | None, total: int) -> int:
    """An absolute count (int >= 0) or a fraction of `total` (float in [0, 1))."""
    if value is None:
        return 0
    if not is_number(value):
        raise ConfigError(
            f"task.split.{name}={value!r} is not valid; accepted: a count >= 0 or a fraction in [0, 1)"
        )
    if isinstance(value, float) and not value.is_integer():
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"task.split.{name}={value!r} is not valid; accepted: a fraction in [0, 1)")
        return round(value * total)
    if value < 0:
        raise ConfigError(f"task.split.{name}={value!r} is not valid; accepted: a count >= 0")
    return int(value)


def check_split_spec(spec: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate the keys of a `split` config: `val`, `test` (counts or fractions), `max_train` (count)."""
    spec = dict(spec or {})
    unknown = sorted(set(spec) - set(SPLIT_KEYS))
    if unknown:
        raise ConfigError(
            f"task.split has unknown key(s) {', '.join(unknown)}; accepted: {', '.join(SPLIT_KEYS)}"
        )
    return spec


@dataclass
class Splits:
    """The result of `split_records`: three disjoint lists plus the number of duplicates dropped."""

    train: list[Any]
    val: list[Any]
    test: list[Any]
    n_duplicates: int

    def parts(self) -> dict[str, list[Any]]:
        """`{"train": [...], "val": [...], "test": [...]}`."""
        return {"train": self.train, "val": self.val, "test": self.test}

    def sizes(self) -> dict[str, int]:
        """`{"train": n, "val": n, "test": n}`."""
        return {part: len(rows) for part, rows in self.parts().items()}


def split_records(
    records: Sequence[T],
    key: Callable[[T], str],
    val: int | float | None = 64,
    test: int | float | None = 128,
    max_train: int | None = None,
) -> Splits:
    """Dedupe by `key`, then cut the hash-sorted survivors into test, val and train (the rest).

    `val` and `test` are counts or fractions of the deduplicated total; `max_train` caps train (keeping
    the first records in hash order). Too few records for the requested sizes is a ConfigError.
    """
    survivors, n_duplicates = dedupe(records, key)
    total = len(survivors)
    n_test, n_val = _count("test", test, total), _count("val", val, total)
    n_cap = _count("max_train", max_train, total) if max_train is not None else None
    if n_test + n_val >= total:
        raise ConfigError(
            f"task.split val={val!r} + test={test!r} leaves no training data from {total} unique records; "
            f"accepted: val + test < {total}"
        )
    ordered = [record for _, record in survivors]
    train = ordered[n_test + n_val :]
    if n_cap is not None:
        if n_cap < 1:
            raise ConfigError(
                f"task.split.max_train={max_train!r} is not valid; accepted: null or a count >= 1"
            )
        train = train[:n_cap]
    return Splits(train, ordered[n_test : n_test + n_val], ordered[:n_test], n_duplicates)
