"""The papers' headline claims, each tested on a study's records with a 95% CI and a verdict.

Every claim is a comparison with LoRA (Hu et al. 2021) on seeds both methods ran (paired, so a seed's
data order and initialisation cancel out), a Student-t 95% CI of the paired effect (compare/stats.py) and
a stated threshold. The verdict reads the CI against the threshold:

- **holds**: the whole CI lies on the claim's side of the threshold;
- **does not hold**: the whole CI lies on the other side (or a fixed, exact part of the claim fails,
  such as the parameter ratio);
- **not separable at this power**: the CI straddles the threshold, or there are too few paired seeds for
  a CI (fewer than 2);
- **not tested**: a method of the claim is absent from the study, or its records lack what the test reads.

The claims (paper, section):

- VeRA (Kopiczko et al. 2024, arXiv 2310.11454, sections 1 and 4): LoRA's score with about 10x fewer
  trainable parameters: LoRA's trainable count >= `PARAM_RATIO` x VeRA's, and VeRA's score no lower than
  LoRA's by more than `SCORE_MARGIN` of LoRA's mean score (non-inferiority).
- LoRA+ (Hayou et al. 2024, arXiv 2402.12354, section 4): faster convergence: the optimizer steps LoRA+
  needs to reach the validation loss LoRA ends with (same seed), as a fraction of the steps LoRA needs,
  below 1. Read from the periodic validation history (at least `MIN_VAL_POINTS` points per run); a
  LoRA+ run that never reaches it counts one validation interval past its last step.
- LoRA-FA (Zhang et al. 2023, arXiv 2308.03303, section 3): lower activation memory: the activations +
  rest share of peak training memory (compare/memory_split.py) relative to LoRA's, below 0; only seeds
  whose two runs ran in the same environment (compare/environments.py) are paired.
- QLoRA (Dettmers et al. 2023, arXiv 2305.14314, sections 1 and 5): LoRA's score at lower weight memory:
  QLoRA's weight bytes below LoRA's, and its score non-inferior within `SCORE_MARGIN`.
- Delta-LoRA (Zi et al. 2023, arXiv 2309.02411, section 5) and DoRA (Liu et al. 2024, arXiv 2402.09353,
  section 5): a score above LoRA's: the paired score difference above 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from peftbench.compare.memory_split import memory_split
from peftbench.compare.stats import Estimate, mean_ci, paired_test
from peftbench.record import Record

HOLDS = "holds"
FAILS = "does not hold"
UNCLEAR = "not separable at this power"
NOT_TESTED = "not tested"
VERDICTS = (HOLDS, FAILS, UNCLEAR, NOT_TESTED)

REFERENCE = "lora"
#: "a small score loss": at most this fraction of LoRA's mean score
SCORE_MARGIN = 0.05
#: "about 10x fewer trainable parameters"
PARAM_RATIO = 10.0
#: validation points a run needs for a learning curve
MIN_VAL_POINTS = 3
VAL_LOSS = "val/loss"

ByMethod = dict[str, dict[int, Record]]


@dataclass
class ClaimResult:
    """One claim's test: what was measured (`effect`, its 95% CI `low`..`high` over `n` paired seeds), the
    threshold, the verdict and why."""

    claim: str
    paper: str
    statement: str
    test: str
    verdict: str
    n: int = 0
    effect: float | None = None
    low: float | None = None
    high: float | None = None
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def estimate(self) -> str:
        """`effect [low, high]`, or what there is."""
        if self.effect is None:
            return "-"
        if self.low is None or self.high is None:
            return f"{self.effect:+.3g} (n={self.n}, no CI)"
        return f"{self.effect:+.3g} [{self.low:+.3g}, {self.high:+.3g}]"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _interval(est: Estimate | None, sign: float = 1.0) -> tuple[float | None, float | None, float | None]:
    """(mean, low, high) of `sign * x`."""
    if est is None:
        return None, None, None
    if est.low is None or est.high is None:
        return sign * est.mean, None, None
    lo, hi = sorted((sign * est.low, sign * est.high))
    return sign * est.mean, lo, hi


def read_ci(low: float | None, high: float | None, bound: float, above: bool) -> str:
    """The verdict of "the effect is above `bound`" (`above`) or "below `bound`" from its CI."""
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return UNCLEAR
    if above:
        return HOLDS if low > bound else FAILS if high <= bound else UNCLEAR
    return HOLDS if high < bound else FAILS if low >= bound else UNCLEAR


def _scores(runs: dict[int, Record], metric: str) -> dict[int, float]:
    return {s: float(r.metrics[metric]) for s, r in runs.items() if metric in r.metrics}


def _mean_of(runs: dict[int, Record], read: Callable[[Record], Any]) -> float | None:
    xs = [float(v) for r in runs.values() if isinstance(v := read(r), int | float)]
    return sum(xs) / len(xs) if xs else None


class _Study:
    """What the claims read: runs by method and seed, the metric and its direction, run -> environment."""

    def __init__(self, by_method: ByMethod, metric: str, higher: bool, run_env: dict[str, str]) -> None:
        self.by_method, self.metric, self.sign, self.run_env = (
            by_method,
            metric,
            1.0 if higher else -1.0,
            run_env,
        )

    def missing(self, *methods: str) -> list[str]:
        return [m for m in methods if not self.by_method.get(m)]

    def gain(self, method: str) -> tuple[float | None, float | None, float | None, int]:
        """The paired score gain of `method` over LoRA (positive: better, whatever the metric's direction)."""
        test = paired_test(
            _scores(self.by_method[method], self.metric), _scores(self.by_method[REFERENCE], self.metric)
        )
        mean, lo, hi = _interval(test.delta if test else None, self.sign)
        return mean, lo, hi, len(test.seeds) if test else 0

    def margin(self) -> float:
        ref = mean_ci(list(_scores(self.by_method[REFERENCE], self.metric).values()))
        return SCORE_MARGIN * abs(ref.mean) if ref else 0.0


def _result(spec: tuple[str, str, str, str], verdict: str, **kw: Any) -> ClaimResult:
    claim, paper, statement, test = spec
    return ClaimResult(claim, paper, statement, test, verdict, **kw)


def _absent(spec: tuple[str, str, str, str], missing: list[str]) -> ClaimResult:
    return _result(spec, NOT_TESTED, detail=f"not in this study: {', '.join(missing)}")


def _too_few(n: int) -> str:
    return f"{n} paired seed(s): a CI needs 2 or more" if n < 2 else ""


def _non_inferior(
    study: _Study, method: str, spec: tuple[str, str, str, str], gate: tuple[bool, str]
) -> ClaimResult:
    """Score non-inferior to LoRA within the margin, after an exact gate (parameter or weight ratio)."""
    mean, lo, hi, n = study.gain(method)
    margin = study.margin()
    ok, why = gate
    verdict = read_ci(lo, hi, -margin, above=True) if ok else FAILS
    detail = f"{why}; margin {margin:.3g} ({SCORE_MARGIN:.0%} of LoRA's mean score). {_too_few(n)}".strip()
    return _result(spec, verdict, n=n, effect=mean, low=lo, high=hi, detail=detail, extra={"margin": margin})


def vera_claim(study: _Study) -> ClaimResult:
    spec = (
        "VeRA: LoRA's score with ~10x fewer parameters",
        "Kopiczko et al. 2024 (arXiv 2310.11454)",
        f"score within {SCORE_MARGIN:.0%} of LoRA's with >= {PARAM_RATIO:g}x fewer trainable parameters",
        f"paired score gain vs LoRA > -{SCORE_MARGIN:.0%} of LoRA's mean; trainable(LoRA)/trainable(VeRA) "
        f">= {PARAM_RATIO:g}",
    )
    if missing := study.missing(REFERENCE, "vera"):
        return _absent(spec, missing)
    lora = _mean_of(study.by_method[REFERENCE], lambda r: r.params.trainable if r.params else None)
    vera = _mean_of(study.by_method["vera"], lambda r: r.params.trainable if r.params else None)
    if not lora or not vera:
        return _result(spec, NOT_TESTED, detail="trainable parameter counts not recorded")
    ratio = lora / vera
    result = _non_inferior(
        study, "vera", spec, (ratio >= PARAM_RATIO, f"{ratio:.1f}x fewer trainable parameters")
    )
    result.extra["param_ratio"] = ratio
    return result


def delta_or_dora_claim(study: _Study, method: str, name: str, paper: str) -> ClaimResult:
    spec = (
        f"{name}: a score above LoRA's",
        paper,
        "a higher score than LoRA",
        "paired score gain vs LoRA > 0",
    )
    if missing := study.missing(REFERENCE, method):
        return _absent(spec, missing)
    mean, lo, hi, n = study.gain(method)
    return _result(
        spec, read_ci(lo, hi, 0.0, above=True), n=n, effect=mean, low=lo, high=hi, detail=_too_few(n)
    )


def qlora_claim(study: _Study) -> ClaimResult:
    spec = (
        "QLoRA: LoRA's score at lower weight memory",
        "Dettmers et al. 2023 (arXiv 2305.14314)",
        f"score within {SCORE_MARGIN:.0%} of LoRA's with smaller weights",
        f"paired score gain vs LoRA > -{SCORE_MARGIN:.0%} of LoRA's mean; weight bytes(QLoRA) < LoRA's",
    )
    if missing := study.missing(REFERENCE, "qlora"):
        return _absent(spec, missing)
    lora = _mean_of(study.by_method[REFERENCE], lambda r: r.params.weight_bytes if r.params else None)
    qlora = _mean_of(study.by_method["qlora"], lambda r: r.params.weight_bytes if r.params else None)
    if not lora or not qlora:
        return _result(spec, NOT_TESTED, detail="weight bytes not recorded")
    ratio = qlora / lora
    result = _non_inferior(study, "qlora", spec, (ratio < 1.0, f"weights {ratio:.2f}x LoRA's"))
    result.extra["weight_ratio"] = ratio
    return result


def lora_fa_claim(study: _Study) -> ClaimResult:
    spec = (
        "LoRA-FA: lower activation memory than LoRA",
        "Zhang et al. 2023 (arXiv 2308.03303)",
        "less activation memory than LoRA",
        "paired relative difference of (peak - weights - gradients/optimizer) vs LoRA < 0, same environment",
    )
    if missing := study.missing(REFERENCE, "lora_fa"):
        return _absent(spec, missing)
    fa, ref = study.by_method["lora_fa"], study.by_method[REFERENCE]
    diffs, skipped = [], 0
    for seed in sorted(set(fa) & set(ref)):
        a, b = memory_split(fa[seed]), memory_split(ref[seed])
        same_env = study.run_env.get(fa[seed].run_id) == study.run_env.get(ref[seed].run_id)
        if a is None or b is None or b["activations_rest_bytes"] <= 0 or not same_env:
            skipped += 1
            continue
        diffs.append(a["activations_rest_bytes"] / b["activations_rest_bytes"] - 1.0)
    if not diffs:
        return _result(
            spec, NOT_TESTED, detail=f"no seed with both runs' memory in one environment ({skipped} skipped)"
        )
    mean, lo, hi = _interval(mean_ci(diffs))
    detail = " ".join(
        x
        for x in (_too_few(len(diffs)), f"{skipped} seed(s) skipped (other environment)" if skipped else "")
        if x
    )
    return _result(
        spec, read_ci(lo, hi, 0.0, above=False), n=len(diffs), effect=mean, low=lo, high=hi, detail=detail
    )


def _val_curve(record: Record) -> list[tuple[int, float]]:
    points = record.history.val if record.history else []
    return sorted((int(p["step"]), float(p[VAL_LOSS])) for p in points if VAL_LOSS in p and "step" in p)


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    """The first validated step whose loss is <= `target` (None: never)."""
    return next((step for step, loss in curve if loss <= target + 1e-12 * max(1.0, abs(target))), None)


def lora_plus_claim(study: _Study) -> ClaimResult:
    spec = (
        "LoRA+: converges faster than LoRA",
        "Hayou et al. 2024 (arXiv 2402.12354)",
        "fewer steps to LoRA's final validation loss",
        "steps(LoRA+) / steps(LoRA) to reach LoRA's final val loss (same seed) < 1",
    )
    if missing := study.missing(REFERENCE, "lora_plus"):
        return _absent(spec, missing)
    plus, ref = study.by_method["lora_plus"], study.by_method[REFERENCE]
    ratios, censored, short = [], 0, 0
    for seed in sorted(set(plus) & set(ref)):
        a, b = _val_curve(plus[seed]), _val_curve(ref[seed])
        if len(a) < MIN_VAL_POINTS or len(b) < MIN_VAL_POINTS:
            short += 1
            continue
        target = b[-1][1]
        lora_steps = steps_to_reach(b, target) or b[-1][0]
        plus_steps = steps_to_reach(a, target)
        if plus_steps is None:  # not reached: one validation interval past its last step
            censored += 1
            plus_steps = a[-1][0] + (a[-1][0] - a[-2][0])
        ratios.append(plus_steps / max(1, lora_steps))
    if not ratios:
        return _result(
            spec,
            NOT_TESTED,
            detail=f"no learning curve: runs validated fewer than {MIN_VAL_POINTS} times ({short} seed(s))",
        )
    mean, lo, hi = _interval(mean_ci(ratios))
    detail = " ".join(
        x
        for x in (
            _too_few(len(ratios)),
            f"LoRA+ never reached it in {censored} seed(s) (counted one interval past its last step)"
            if censored
            else "",
        )
        if x
    )
    return _result(
        spec, read_ci(lo, hi, 1.0, above=False), n=len(ratios), effect=mean, low=lo, high=hi, detail=detail
    )


def evaluate_claims(
    by_method: ByMethod, metric: str, higher_is_better: bool, run_env: dict[str, str]
) -> list[ClaimResult]:
    """Every claim tested on one study's ok runs (`by_method`: method -> seed -> record)."""
    study = _Study(by_method, metric, higher_is_better, run_env)
    return [
        vera_claim(study),
        lora_plus_claim(study),
        lora_fa_claim(study),
        qlora_claim(study),
        delta_or_dora_claim(study, "delta_lora", "Delta-LoRA", "Zi et al. 2023 (arXiv 2309.02411)"),
        delta_or_dora_claim(study, "dora", "DoRA", "Liu et al. 2024 (arXiv 2402.09353)"),
    ]


def thresholds_note() -> str:
    """The thresholds, for the report."""
    return (
        "Thresholds: 'a small score loss' / 'close to LoRA' = the 95% CI of the paired score gain "
        f"lies above -{SCORE_MARGIN:.0%} of LoRA's mean score; '~10x fewer parameters' = a "
        f"trainable-count ratio >= {PARAM_RATIO:g}; 'faster' = the CI of steps(LoRA+)/steps(LoRA) to "
        f"LoRA's final validation loss lies below 1 (curves of >= {MIN_VAL_POINTS} validation points); "
        "'lower memory' / 'above LoRA' = the CI lies below / above 0. Verdicts: holds (CI on the claim's "
        "side), does not hold (CI on the other side, or the exact ratio fails), not separable at this power "
        "(CI straddles the threshold, or fewer than 2 paired seeds), not tested (a method is absent or its "
        "records lack the measurement)."
    )


__all__ = ["VERDICTS", "ClaimResult", "evaluate_claims", "read_ci", "steps_to_reach", "thresholds_note"]
