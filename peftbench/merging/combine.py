"""Combining task vectors: task arithmetic, TIES and DARE, plus two diagnostics (sign conflicts, cosine).

Pure tensor functions over task vectors given as dicts ``name -> tensor`` (`peftbench.merging.task_vectors`;
a name a vector lacks counts as zeros there). Every combination returns the merged change
``lambda * merged`` (`scale` is lambda), to be added to the base: ``W = W0 + lambda * merged``.

- Task arithmetic (Ilharco et al. 2022, arXiv 2212.04089, Sec. 2): ``merged = sum_i w_i tau_i``.
- TIES (Yadav et al. 2023, arXiv 2306.01708, Sec. 3 and Algorithm 1): trim each tau_i to its top-`density`
  fraction of entries by magnitude; elect a sign per entry, ``sign(sum_i trimmed tau_i)`` (ties to +);
  disjoint mean: per entry, the mean of the weighted trimmed values whose sign agrees with the elected one.
- DARE (Yu et al. 2023, arXiv 2311.03099, Sec. 4.1): drop each entry of tau_i with probability
  ``1 - density`` and rescale the kept ones by ``1 / density`` (the expectation is unchanged), then task
  arithmetic (``dare_linear``) or TIES' sign election and disjoint mean (``dare_ties``).

The operations follow HF PEFT's ``peft.utils.merge_utils`` (the oracle in tests/test_merging_ops.py),
including its conventions where the papers leave a choice: the weights multiply the trimmed values after the
sign election; an entry whose summed mass is 0 elects +. Two deliberate differences: DARE draws from its own
generator seeded with `seed` (PEFT draws from torch's global one), names in sorted order and, per name, the
vectors in order, so that seed s gives what PEFT's function gives called name by name in that order after one
``torch.manual_seed(s)``; and the trim keeps ``floor(density * n)`` entries with a 1e-9 tolerance, where
PEFT's ``int(density * n)`` keeps one fewer when the product lands just below an integer (0.29 * 100).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from peftbench.errors import ConfigError, bad_value

Vectors = Sequence[Mapping[str, torch.Tensor]]
#: the combinations of dense task vectors (``cat`` works on LoRA factors: `peftbench.merging.low_rank`)
COMBINATIONS = ("task_arithmetic", "ties", "dare_linear", "dare_ties")


# ----- checks and alignment -----------------------------------------------------------------------------
def check_density(density: float) -> float:
    if isinstance(density, bool) or not isinstance(density, int | float) or not 0 < density <= 1:
        raise bad_value("density", density, "a number in (0, 1] (the fraction of entries kept)")
    return float(density)


def _weights(vectors: Vectors, weights: Sequence[float] | None) -> list[float]:
    if not vectors:
        raise ConfigError("no task vectors to combine; accepted: one or more")
    if weights is None:
        return [1.0] * len(vectors)
    weights = [float(w) for w in weights]
    if len(weights) != len(vectors) or not all(math.isfinite(w) for w in weights):
        raise bad_value("weights", weights, f"{len(vectors)} finite numbers, one per task vector")
    return weights


def _scale(scale: float) -> float:
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
        raise bad_value("scale", scale, "a finite number (lambda)")
    return float(scale)


def names(vectors: Vectors) -> list[str]:
    """Every name any vector holds, sorted."""
    return sorted({name for vector in vectors for name in vector})


def stacked(vectors: Vectors, name: str) -> torch.Tensor:
    """The vectors' tensors for `name`, fp32, stacked on a new dim 0 (zeros where a vector lacks it)."""
    present = [v[name] for v in vectors if name in v]
    shape, device = present[0].shape, present[0].device
    bad = [tuple(t.shape) for t in present if t.shape != shape]
    if bad:
        raise ConfigError(
            f"task vectors disagree on the shape of {name!r} ({tuple(shape)} and {bad[0]}); "
            "accepted: task vectors of one base model"
        )
    zeros = torch.zeros(shape, dtype=torch.float32, device=device)
    return torch.stack([v[name].to(device, torch.float32) if name in v else zeros for v in vectors])


def _column(weights: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """`weights` shaped (n, 1, ..., 1) to multiply a stack `like`."""
    column = torch.tensor(weights, dtype=like.dtype, device=like.device)
    return column.reshape(-1, *([1] * (like.dim() - 1)))


# ----- the per-tensor steps -----------------------------------------------------------------------------
def trim(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """TIES' trim: keep the ``floor(density * n)`` entries of largest magnitude, zero the rest."""
    if density >= 1:
        return tensor
    keep = math.floor(density * tensor.numel() + 1e-9)
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    mask[torch.topk(tensor.abs().reshape(-1), k=keep, largest=True).indices] = 1
    return tensor * mask.reshape(tensor.shape)


def dare_drop(tensor: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE's drop and rescale: each entry kept with probability `density` (a Bernoulli draw from
    `generator`, on CPU) and divided by `density`; the expectation is `tensor`. Nothing drawn at density 1."""
    if density >= 1:
        return tensor
    keep = torch.bernoulli(torch.full(tensor.shape, density, dtype=tensor.dtype), generator=generator)
    return tensor * keep.to(tensor.device) / density


def elect_sign(trimmed: torch.Tensor) -> torch.Tensor:
    """TIES' sign election over a stack (n, ...): True where an entry's sign equals
    ``sign(sum_i trimmed_i)`` (+ where that sum is 0); zeros never agree."""
    elected = torch.where(trimmed.sum(dim=0) >= 0, 1.0, -1.0).to(trimmed.dtype)
    return trimmed.sign() == elected


def disjoint_mean(weighted: torch.Tensor, agree: torch.Tensor) -> torch.Tensor:
    """TIES' disjoint merge: per entry, the sum of the agreeing values over their count (at least 1)."""
    return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)


def _ties_stack(parts: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    return disjoint_mean(parts * _column(weights, parts), elect_sign(parts))


def _linear_stack(parts: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    return (parts * _column(weights, parts)).sum(dim=0)


def _scaled(merged: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    return merged if scale == 1 else {name: scale * t for name, t in merged.items()}


# ----- the combinations ---------------------------------------------------------------------------------
def task_arithmetic(
    vectors: Vectors, weights: Sequence[float] | None = None, scale: float = 1.0
) -> dict[str, torch.Tensor]:
    """``scale * sum_i w_i tau_i`` (arXiv 2212.04089)."""
    w, scale = _weights(vectors, weights), _scale(scale)
    return _scaled({n: _linear_stack(stacked(vectors, n), w) for n in names(vectors)}, scale)


def ties(
    vectors: Vectors, weights: Sequence[float] | None = None, *, density: float, scale: float = 1.0
) -> dict[str, torch.Tensor]:
    """TIES-merging (arXiv 2306.01708): trim to `density`, elect signs, disjoint mean, times `scale`."""
    w, density, scale = _weights(vectors, weights), check_density(density), _scale(scale)
    merged = {}
    for name in names(vectors):
        parts = torch.stack([trim(t, density) for t in stacked(vectors, name)])
        merged[name] = _ties_stack(parts, w)
    return _scaled(merged, scale)


def _dare(
    vectors: Vectors, weights: Sequence[float] | None, density: float, seed: int, scale: float, elect: bool
) -> dict[str, torch.Tensor]:
    w, density, scale = _weights(vectors, weights), check_density(density), _scale(scale)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise bad_value("seed", seed, "an integer")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    merged = {}
    for name in names(vectors):
        parts = torch.stack([dare_drop(t, density, generator) for t in stacked(vectors, name)])
        merged[name] = _ties_stack(parts, w) if elect else _linear_stack(parts, w)
    return _scaled(merged, scale)


def dare_linear(
    vectors: Vectors, weights: Sequence[float] | None = None, *, density: float, seed: int, scale: float = 1.0
) -> dict[str, torch.Tensor]:
    """DARE (arXiv 2311.03099) then task arithmetic: seeded drop with probability ``1 - density``, rescale
    by ``1 / density``, ``scale * sum_i w_i dropped_i``."""
    return _dare(vectors, weights, density, seed, scale, elect=False)


def dare_ties(
    vectors: Vectors, weights: Sequence[float] | None = None, *, density: float, seed: int, scale: float = 1.0
) -> dict[str, torch.Tensor]:
    """DARE's seeded drop and rescale, then TIES' sign election and disjoint mean (no magnitude trim)."""
    return _dare(vectors, weights, density, seed, scale, elect=True)


def combine(
    how: str,
    vectors: Vectors,
    weights: Sequence[float] | None = None,
    *,
    density: float = 1.0,
    scale: float = 1.0,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """`how` (one of `COMBINATIONS`) over `vectors`: the merged change to add to the base."""
    if how == "task_arithmetic":
        return task_arithmetic(vectors, weights, scale)
    if how == "ties":
        return ties(vectors, weights, density=density, scale=scale)
    if how == "dare_linear":
        return dare_linear(vectors, weights, density=density, seed=seed, scale=scale)
    if how == "dare_ties":
        return dare_ties(vectors, weights, density=density, seed=seed, scale=scale)
    raise bad_value("how", how, COMBINATIONS)


# ----- diagnostics --------------------------------------------------------------------------------------
def sign_conflict_rate(vectors: Vectors, density: float = 1.0) -> float:
    """The fraction of entries, among those where at least two vectors are non-zero (after trimming each to
    `density`, as TIES does before it elects signs), at which the non-zero values do not all share one sign.
    0.0 where no entry has two non-zero values."""
    density = check_density(density)
    conflicts = shared = 0
    for name in names(vectors):
        parts = torch.stack([trim(t, density) for t in stacked(vectors, name)])
        positive, negative = (parts > 0).any(dim=0), (parts < 0).any(dim=0)
        conflicts += int((positive & negative).sum())
        shared += int(((parts != 0).sum(dim=0) >= 2).sum())
    return conflicts / shared if shared else 0.0


def cosine_similarity(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """Cosine between two task vectors flattened over all their names (a missing name is zeros), in fp64;
    nan when either is all zeros."""
    dot = norm_a = norm_b = 0.0
    for name in names([a, b]):
        if name in a and name in b:
            dot += float((a[name].double() * b[name].double().to(a[name].device)).sum())
        norm_a += float(a[name].double().square().sum()) if name in a else 0.0
        norm_b += float(b[name].double().square().sum()) if name in b else 0.0
    if norm_a == 0 or norm_b == 0:
        return math.nan
    return dot / math.sqrt(norm_a * norm_b)


def cosine_matrix(vectors: Vectors) -> torch.Tensor:
    """The (n, n) fp64 matrix of pairwise `cosine_similarity`."""
    n = len(vectors)
    matrix = torch.empty(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i, n):
            matrix[i, j] = matrix[j, i] = cosine_similarity(vectors[i], vectors[j])
    return matrix
