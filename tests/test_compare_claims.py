"""The claims section (peftbench/compare/claims.py) on hand-made records: each verdict comes out each way."""

from __future__ import annotations

import math
from typing import Any

import pytest

from peftbench.compare import summarize
from peftbench.compare.claims import FAILS, HOLDS, NOT_TESTED, UNCLEAR, read_ci, steps_to_reach
from peftbench.compare.memory_split import memory_split
from peftbench.record import load_record
from tests.test_compare import make_record

NOISE = (0.0, 0.001, -0.001)  # per seed: tight CIs
WIDE = (0.0, 0.08, -0.08)  # per seed: a CI wider than any effect here


def record(method: str, seed: int, score: float, **over: Any) -> dict[str, Any]:
    """A record (tests/test_compare.make_record) with its trainable count, weights, peak and validation
    curve overridden where given."""
    trainable = over.get("trainable", 32_768)
    rec = make_record(method, seed, score, trainable, over.get("peak", 900 * 2**20), 0.5)
    rec["params"]["weight_bytes"] = over.get("weights", 13_010_240)
    if "val" in over:
        rec["history"]["val"] = [{"step": s, "val/loss": v} for s, v in over["val"]]
    rec["env"]["cpu_threads"] = over.get("threads", 2)
    return rec


def study(spec: dict[str, list[dict[str, Any]]], metric: str | None = None) -> dict[str, dict[str, Any]]:
    """`spec`: method -> one dict of `record` arguments per seed. Returns claim name prefix -> claim."""
    records = [record(m, seed, **kw) for m, seeds in spec.items() for seed, kw in enumerate(seeds)]
    summary = summarize(records, metric=metric)
    return {c["claim"].split(":")[0]: c for c in summary.claims}


def lora(n: int = 3, **kw: Any) -> list[dict[str, Any]]:
    return [{"score": 0.21 + NOISE[i], **kw} for i in range(n)]


def shifted(delta: float, noise: tuple[float, ...] = NOISE, n: int = 3, **kw: Any) -> list[dict[str, Any]]:
    """Seeds scoring LoRA's score of the same seed + `delta` + `noise`."""
    return [{"score": 0.21 + NOISE[i] + delta + noise[i], **kw} for i in range(n)]


# ---- the verdict rule -------------------------------------------------------------------------------------


def test_read_ci_each_way() -> None:
    assert read_ci(0.1, 0.3, 0.0, above=True) == HOLDS
    assert read_ci(-0.3, -0.1, 0.0, above=True) == FAILS
    assert read_ci(-0.1, 0.1, 0.0, above=True) == UNCLEAR
    assert read_ci(-0.3, -0.1, 0.0, above=False) == HOLDS
    assert read_ci(0.1, 0.3, 0.0, above=False) == FAILS
    assert read_ci(None, None, 0.0, above=True) == UNCLEAR


def test_steps_to_reach() -> None:
    curve = [(2, 3.0), (4, 2.5), (6, 2.4)]
    assert steps_to_reach(curve, 2.5) == 4 and steps_to_reach(curve, 2.0) is None


# ---- VeRA -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("vera", "verdict"),
    [
        (shifted(-0.002, trainable=2_048), HOLDS),  # 16x fewer, within 5% of 0.21
        (shifted(-0.05, trainable=2_048), FAILS),  # far below the margin
        (shifted(-0.002, trainable=16_384), FAILS),  # only 2x fewer parameters
        (shifted(-0.002, WIDE, trainable=2_048), UNCLEAR),
    ],
)
def test_vera_claim(vera: list[dict[str, Any]], verdict: str) -> None:
    claim = study({"lora": lora(), "vera": vera})["VeRA"]
    assert claim["verdict"] == verdict and claim["n"] == 3
    assert claim["extra"]["margin"] == pytest.approx(0.05 * 0.21)


def test_one_seed_is_not_separable_and_absent_method_not_tested() -> None:
    claims = study({"lora": lora(1), "vera": shifted(-0.002, n=1, trainable=2_048)})
    assert claims["VeRA"]["verdict"] == UNCLEAR and "a CI needs 2" in claims["VeRA"]["detail"]
    assert claims["DoRA"]["verdict"] == NOT_TESTED and "dora" in claims["DoRA"]["detail"]
    assert study({"vera": shifted(0.0, trainable=2_048)})["VeRA"]["verdict"] == NOT_TESTED  # no LoRA


# ---- Delta-LoRA and DoRA ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["delta_lora", "dora"])
@pytest.mark.parametrize(
    ("delta", "noise", "verdict"), [(0.02, NOISE, HOLDS), (-0.02, NOISE, FAILS), (0.0, WIDE, UNCLEAR)]
)
def test_above_lora_claims(method: str, delta: float, noise: tuple[float, ...], verdict: str) -> None:
    claims = study({"lora": lora(), method: shifted(delta, noise)})
    claim = claims["Delta-LoRA" if method == "delta_lora" else "DoRA"]
    assert claim["verdict"] == verdict
    assert claim["effect"] == pytest.approx(delta, abs=1e-9)


def test_lower_is_better_metric_flips_the_gain() -> None:
    # make_record: test/loss = 3 - score, so a higher score is a lower loss: still a gain
    claims = study({"lora": lora(), "dora": shifted(0.02)}, metric="test/loss")
    assert claims["DoRA"]["verdict"] == HOLDS and claims["DoRA"]["effect"] == pytest.approx(0.02)


# ---- QLoRA ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weights", "delta", "noise", "verdict"),
    [
        (4_000_000, -0.002, NOISE, HOLDS),
        (4_000_000, -0.05, NOISE, FAILS),
        (13_010_240, -0.002, NOISE, FAILS),  # weights no smaller than LoRA's
        (4_000_000, -0.002, WIDE, UNCLEAR),
    ],
)
def test_qlora_claim(weights: int, delta: float, noise: tuple[float, ...], verdict: str) -> None:
    claim = study({"lora": lora(), "qlora": shifted(delta, noise, weights=weights)})["QLoRA"]
    assert claim["verdict"] == verdict


# ---- LoRA-FA ----------------------------------------------------------------------------------------------

MiB = 2**20


def _peaks(base: float, rel: tuple[float, ...]) -> list[dict[str, Any]]:
    return [{"score": 0.2, "peak": int(base * (1 + r))} for r in rel]


@pytest.mark.parametrize(
    ("fa_rel", "verdict"),
    [((-0.30, -0.31, -0.29), HOLDS), ((0.20, 0.21, 0.19), FAILS), ((-0.3, 0.3, 0.0), UNCLEAR)],
)
def test_lora_fa_memory_claim(fa_rel: tuple[float, ...], verdict: str) -> None:
    base = 900 * MiB
    # LoRA-FA trains half of LoRA's parameters; the claim is read on the activations + rest share
    fa = [{**p, "trainable": 16_384} for p in _peaks(base, fa_rel)]
    claim = study({"lora": _peaks(base, (0.0, 0.0, 0.0)), "lora_fa": fa})["LoRA-FA"]
    assert claim["verdict"] == verdict


def test_lora_fa_memory_pairs_only_one_environment() -> None:
    base = 900 * MiB
    fa = [{**p, "threads": 1} for p in _peaks(base, (-0.3, -0.31, -0.29))]
    claim = study({"lora": _peaks(base, (0.0, 0.0, 0.0)), "lora_fa": fa})["LoRA-FA"]
    assert claim["verdict"] == NOT_TESTED and "environment" in claim["detail"]


def test_memory_split_parts_add_up() -> None:
    rec = load_record(record("lora", 0, 0.2, peak=900 * MiB, trainable=32_768, weights=13_010_240))
    split = memory_split(rec)
    assert split is not None and split["grads_optimizer_bytes"] == 32_768 * 12  # fp32 grad + AdamW's 2
    total = split["weights_bytes"] + split["grads_optimizer_bytes"] + split["activations_rest_bytes"]
    assert math.isclose(total, 900 * MiB)


# ---- LoRA+ ------------------------------------------------------------------------------------------------


def curve(final: float, reach_at: int | None, steps: int = 10) -> list[tuple[int, float]]:
    """A validation curve every 2 steps ending at `final`; it first gets to `final` at `reach_at`."""
    points = []
    for s in range(2, steps + 1, 2):
        points.append((s, final - 0.01 if reach_at is not None and s >= reach_at else final + 0.5 / s))
    if reach_at is None or reach_at > steps:
        points[-1] = (steps, final + 0.05)
    return points


def _with_curves(reach: list[int | None]) -> list[dict[str, Any]]:
    return [{"score": 0.2, "val": curve(2.0, r)} for r in reach]


@pytest.mark.parametrize(
    ("reach", "verdict"),
    [([4, 4, 6], HOLDS), ([None, None, None], FAILS), ([2, None, 10], UNCLEAR)],
)
def test_lora_plus_convergence_claim(reach: list[int | None], verdict: str) -> None:
    lora_runs = [{"score": 0.2, "val": [(s, 2.0 + 0.5 / s) for s in (2, 4, 6, 8)] + [(10, 2.0)]}] * 3
    claim = study({"lora": lora_runs, "lora_plus": _with_curves(reach)})["LoRA+"]
    assert claim["verdict"] == verdict, claim
    if verdict == FAILS:
        assert "never reached" in claim["detail"] and claim["effect"] == pytest.approx(1.2)


def test_lora_plus_without_a_learning_curve_is_not_tested() -> None:
    claims = study({"lora": lora(), "lora_plus": shifted(0.0)})  # one validation point per run
    assert claims["LoRA+"]["verdict"] == NOT_TESTED and "validated fewer than 3" in claims["LoRA+"]["detail"]
