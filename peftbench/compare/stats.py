"""Statistics over seeds: mean with a Student-t 95% CI, a paired t-test, Pareto fronts.

scipy is used for the t distribution when it is installed; otherwise the t CDF comes from the regularized
incomplete beta function, I_x(a, b), evaluated with its continued fraction (Numerical Recipes, 3rd ed.,
section 6.4), which is accurate to about 1e-14, and the quantile from bisection on that CDF.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

try:  # pragma: no cover - depends on the environment
    from scipy import stats as _scipy_stats
except ImportError:  # pragma: no cover
    _scipy_stats = None


@dataclass(frozen=True)
class Estimate:
    """Mean of `n` values with the half-width of its confidence interval (None when n < 2)."""

    mean: float
    half_width: float | None
    n: int
    std: float | None

    @property
    def low(self) -> float | None:
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> float | None:
        return None if self.half_width is None else self.mean + self.half_width


@dataclass(frozen=True)
class PairedTest:
    """Paired differences (method - baseline) over the seeds both have: their mean, CI, t and p."""

    delta: Estimate
    t: float | None
    p: float | None
    seeds: tuple[int, ...]


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for aa in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_sf2(t: float, df: float) -> float:
    """Two-sided tail probability P(|T| >= |t|) of Student's t with `df` degrees of freedom."""
    if math.isinf(t):
        return 0.0
    if _scipy_stats is not None:
        return float(2.0 * _scipy_stats.t.sf(abs(t), df))
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_ppf(q: float, df: float) -> float:
    """The `q` quantile of Student's t (0.5 < q < 1), e.g. t_ppf(0.975, 2) = 4.3027."""
    if not 0.5 < q < 1.0:
        raise ValueError(f"q={q!r} is not valid; accepted: 0.5 < q < 1")
    if _scipy_stats is not None:
        return float(_scipy_stats.t.ppf(q, df))
    target = 2.0 * (1.0 - q)  # two-sided tail mass beyond the quantile
    lo, hi = 0.0, 1.0
    while t_sf2(hi, df) > target:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_sf2(mid, df) > target else (lo, mid)
        if hi - lo < 1e-13 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> Estimate | None:
    """Mean and Student-t CI half-width t_{(1+c)/2, n-1} * s / sqrt(n); None for no finite value."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return None
    mean = math.fsum(xs) / n
    if n < 2:
        return Estimate(mean, None, n, None)
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_ppf(0.5 + confidence / 2.0, n - 1) * std / math.sqrt(n)
    return Estimate(mean, half, n, std)


def paired_test(
    method: Mapping[int, float], baseline: Mapping[int, float], confidence: float = 0.95
) -> PairedTest | None:
    """Paired t-test of `method - baseline` over the seeds present in both (same as scipy's ttest_rel).

    Returns None when no seed is shared; t and p are None with fewer than two pairs, or when every
    difference is zero; p is 0 when the differences are constant and non-zero.
    """
    seeds = tuple(sorted(set(method) & set(baseline)))
    diffs = [method[s] - baseline[s] for s in seeds]
    delta = mean_ci(diffs, confidence)
    if delta is None:
        return None
    if delta.n < 2 or delta.std is None:
        return PairedTest(delta, None, None, seeds)
    if delta.std == 0.0:
        if delta.mean == 0.0:
            return PairedTest(delta, None, None, seeds)
        return PairedTest(delta, math.copysign(math.inf, delta.mean), 0.0, seeds)
    t = delta.mean / (delta.std / math.sqrt(delta.n))
    return PairedTest(delta, t, t_sf2(t, delta.n - 1), seeds)


def pareto_front(
    costs: Sequence[float], scores: Sequence[float], higher_is_better: bool = True
) -> list[bool]:
    """Which points are Pareto-optimal: no other point has a cost <= and a score at least as good, with
    one of the two strictly better. Points with a missing (None/NaN) value are never on the front."""

    def ok(v: float | None) -> bool:
        return v is not None and math.isfinite(v)

    sign = 1.0 if higher_is_better else -1.0
    pts = [(c, sign * s) if ok(c) and ok(s) else None for c, s in zip(costs, scores, strict=True)]
    front = []
    for p in pts:
        if p is None:
            front.append(False)
            continue
        dominated = any(
            q is not None and q[0] <= p[0] and q[1] >= p[1] and (q[0] < p[0] or q[1] > p[1]) for q in pts
        )
        front.append(not dominated)
    return front
