"""Equal-parameter budgets (peftbench/budget.py): each knob-bearing method's size fits N on tiny-llama, the
next size up does not; knob-less methods are reported as not budget-matched; the report states it."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

import peftbench.methods  # noqa: F401  (registers every method)
from peftbench.budget import apply_budget, budget_statement, fit_size, largest_within, param_budget
from peftbench.compare import load_study, write_report
from peftbench.errors import ConfigError
from peftbench.methods import build_method
from peftbench.methods.registry import METHODS, method_config_file
from peftbench.models.params import count_parameters
from tests.conftest import tiny_model_cfg
from tests.test_compare import make_record

CONF = Path(__file__).resolve().parents[1] / "conf"
N = 50_000  # on tiny-llama: LoRA 2,048 per rank, VeRA 14 per rank (+ 1,024), one block 37k
KNOB_METHODS = sorted(name for name, cls in METHODS.items() if cls.size_knob)


def method_values(name: str) -> dict[str, Any]:
    return method_config_file(CONF / "method" / f"{name}.yaml")


def count_on_real_copy(model: Any, values: dict[str, Any]) -> int:
    """The trainable count of the method applied to a real (not meta) copy, as a run does it."""
    method = build_method(values)
    return count_parameters(method.apply(copy.deepcopy(model)), trainable_only=True)


def test_size_knobs_are_declared() -> None:
    assert {"lora", "lora_fa", "lora_plus", "delta_lora", "qlora", "vera", "partial"} <= set(KNOB_METHODS)
    assert all(METHODS[m].size_knob is None for m in ("full", "bitfit", "ln_tuning"))
    for name in KNOB_METHODS:  # the knob is an integer hyper-parameter of the method
        assert isinstance(method_values(name).get(METHODS[name].size_knob, 1), int), name


@pytest.mark.parametrize("name", KNOB_METHODS)
def test_budget_fits_and_the_next_size_exceeds(name: str, tiny_model_and_tokenizer: tuple[Any, Any]) -> None:
    model = tiny_model_and_tokenizer[0]
    values = method_values(name)
    fit = fit_size(values, model, N)
    assert fit.knob == METHODS[name].size_knob and fit.value >= 1
    at = count_on_real_copy(model, {**values, fit.knob: fit.value})
    assert at == fit.trainable <= N
    try:
        above = count_on_real_copy(model, {**values, fit.knob: fit.value + 1})
    except ConfigError:  # e.g. more blocks than the model has
        above = None
    assert above == fit.next_trainable
    assert above is None or above > N
    assert count_parameters(model, trainable_only=True) > 0  # the shared model was not modified


def test_lora_rank_matches_its_formula(tiny_model_and_tokenizer: tuple[Any, Any]) -> None:
    """LoRA trains r (d_in + d_out) per wrapped linear: tiny-llama's 14 linears sum to 2,048 per rank."""
    fit = fit_size(method_values("lora"), tiny_model_and_tokenizer[0], N)
    assert (fit.value, fit.trainable, fit.next_trainable) == (
        N // 2048,
        2048 * (N // 2048),
        2048 * (N // 2048 + 1),
    )
    assert fit.counted_on == "meta"


def test_budget_below_the_smallest_size_is_one_line(tiny_model_and_tokenizer: tuple[Any, Any]) -> None:
    with pytest.raises(ConfigError, match=r"budget.trainable_params=1,000 is below lora's smallest size"):
        fit_size(method_values("lora"), tiny_model_and_tokenizer[0], 1_000)
    with pytest.raises(ConfigError, match="a method with a size knob"):
        fit_size(method_values("full"), tiny_model_and_tokenizer[0], N)


def test_largest_within_search() -> None:
    calls: list[int] = []

    def affine(v: int) -> float:
        calls.append(v)
        return 100 + 7 * v

    assert largest_within(affine, 1000, guess=(1000 - 107) // 7 + 1) == 128
    assert len(set(calls)) <= 3  # 1, the guess, the guess + 1
    for guess in (None, 1, 5, 127, 129, 10_000, 2**30):  # a bad guess costs evaluations, not correctness
        assert largest_within(affine, 1000, guess) == 128
    steps = lambda v: 10 * (v // 4)  # noqa: E731  (flat stretches)
    assert largest_within(steps, 25, 1) == 11
    capped = lambda v: v if v <= 5 else math.inf  # noqa: E731  (invalid sizes above 5)
    assert largest_within(capped, 1_000, 2) == 5
    with pytest.raises(ValueError):
        largest_within(affine, 50)


def run_config(*overrides: str) -> Any:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    cfg.model = tiny_model_cfg()
    return cfg


def test_apply_budget_sets_the_knob_in_the_config() -> None:
    cfg = run_config("method=vera", f"budget.trainable_params={N}")
    fit = apply_budget(cfg)
    assert fit is not None and cfg.method.r == fit.value == (N - 1024) // 14
    assert cfg.budget.fit.matched and cfg.budget.fit.trainable == fit.trainable
    untouched = run_config("method=lora")
    assert apply_budget(untouched) is None and untouched.method.r == 16 and "fit" not in untouched.budget
    full = run_config("method=full", f"budget.trainable_params={N}")
    assert apply_budget(full) is None and full.budget.fit.matched is False
    quantized = run_config("method=qlora", f"budget.trainable_params={N}")  # counted on real copies
    rng = torch.get_rng_state()
    assert apply_budget(quantized).counted_on == "copy" and quantized.method.r == N // 2048
    assert torch.equal(torch.get_rng_state(), rng)  # building adapters to count them drew no random numbers
    for bad in ("-5", "abc", "true", "1.5"):
        with pytest.raises(ConfigError, match=r"budget.trainable_params=.* is not valid"):
            apply_budget(run_config("method=lora", f"budget.trainable_params={bad}"))


def test_report_states_the_parameter_budget(tmp_path: Path) -> None:
    fits = {
        "lora": {"matched": True, "knob": "r", "value": 24, "trainable": 49_152, "next_trainable": 51_200},
        "vera": {"matched": True, "knob": "r", "value": 3498, "trainable": 49_996, "next_trainable": 50_010},
        "full": {"matched": False, "knob": None},
    }
    for seed in (0, 1):
        for method, fit in fits.items():
            record = make_record(method, seed, 0.2 + 0.01 * seed, fit.get("trainable", 3_252_544), 2**30, 0.5)
            record["config"]["budget"] = {"trainable_params": N, "fit": {**fit, "target": N}}
            (tmp_path / f"{record['run_id']}.json").write_text(json.dumps(record))
    records, summary = load_study(tmp_path)
    line = budget_statement(summary.budget["trainable_params"])
    assert line == (
        "Trainable-parameter budget: <= 50,000 per method, size knob chosen on the model: "
        "lora r=24 (49,152), vera r=3498 (49,996); not budget-matched (no size knob): full."
    )
    paths = write_report(records, summary, tmp_path / "report")
    assert line in paths["markdown"].read_text()
    assert "Trainable-parameter budget: &lt;= 50,000" in paths["html"].read_text()
    assert param_budget([]) == {"target": None, "methods": {}}
    assert (
        budget_statement(param_budget([]))
        == "Trainable-parameter budget: none (each method at its configured size)."
    )
