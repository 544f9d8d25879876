"""Equal-parameter-budget comparisons: each method's size knob chosen to fit `budget.trainable_params`.

    python -m peftbench.run -m method=lora,vera,lora_fa budget.trainable_params=1000000 seed=0,1,2

A method names its size knob in a ClassVar (`PeftMethod.size_knob`: LoRA's and VeRA's `r`, partial
fine-tuning's `k`, ...). The knob's value is the largest integer whose trainable-parameter count on the
run's actual model is <= the budget, so the next value up exceeds it. Counts are structural: the method is
applied to a copy of the model on the meta device (no weight storage) and its trainable parameters are
counted; a method that cannot be applied there (one that reads the weights, e.g. QLoRA quantizes them) is
applied to a real copy instead. Nothing here knows a method's formula. Methods without a knob (full,
BitFit, LN tuning) train what they train: their runs say `matched: false` and the report lists them as not
budget-matched.

The choice is written into the run's config (`method.<knob>` and `budget.fit`), so the record, W&B and the
comparison report carry it.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf, open_dict

from peftbench.errors import ConfigError, bad_value, check_int

if TYPE_CHECKING:
    from peftbench.record import Record

log = logging.getLogger(__name__)

#: the largest knob value the search tries (a budget above what any size reaches picks the largest valid)
MAX_SIZE = 2**24


@dataclass(frozen=True)
class Fit:
    """The size chosen for a budget: `knob=value` gives `trainable` parameters (<= target); `value + 1`
    gives `next_trainable` (> target, or None where `value + 1` is not a valid size)."""

    method: str
    knob: str
    value: int
    trainable: int
    next_trainable: int | None
    target: int
    counted_on: str  # "meta" or "copy"


def largest_within(count: Callable[[int], float], target: int, guess: int | None = None) -> int:
    """The largest v >= 1 with count(v) <= target, for a non-decreasing `count` (math.inf: not a valid
    size). Starts from `guess`, then gallops and bisects, so an affine count needs about 4 evaluations."""
    if count(1) > target:
        raise ValueError("count(1) exceeds the target")
    lo, hi = 1, None
    probe = min(max(1, guess or 1), MAX_SIZE)
    if count(probe) <= target:
        lo = probe
        step = 1
        while hi is None:
            nxt = min(lo + step, MAX_SIZE + 1)
            if nxt > MAX_SIZE or count(nxt) > target:
                hi = nxt
            else:
                lo, step = nxt, step * 2
    else:
        hi = probe
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count(mid) <= target:
            lo = mid
        else:
            hi = mid
    return lo


class _Counter:
    """Trainable-parameter count of a method at each knob value, on the given model (memoised)."""

    def __init__(self, model: Any, values: dict[str, Any], knob: str) -> None:
        self.model, self.values, self.knob = model, values, knob
        self.meta: Any = _meta_copy(model)
        self.counts: dict[int, float] = {}

    @property
    def counted_on(self) -> str:
        return "meta" if self.meta is not None else "copy"

    def __call__(self, value: int) -> float:
        if value not in self.counts:
            self.counts[value] = self._count(value)
        return self.counts[value]

    def _count(self, value: int) -> float:
        from peftbench.methods import build_method

        try:
            return self._apply_and_count(build_method({**self.values, self.knob: value}))
        except ConfigError:
            if value == 1:
                raise  # even the smallest size is refused: the reason is the method's own message
            return math.inf  # not a valid size (e.g. more blocks than the model has): above any budget

    def _apply_and_count(self, method: Any) -> int:
        from peftbench.models.params import count_parameters

        if self.meta is not None:
            try:
                return count_parameters(method.apply(copy.deepcopy(self.meta)), trainable_only=True)
            except ConfigError:
                raise
            except Exception as err:  # the method reads the weights: count on real copies from now on
                log.info(
                    "budget: %s cannot be applied on the meta device (%s); counting on copies",
                    method.name,
                    err,
                )
                self.meta = None
        return count_parameters(method.apply(copy.deepcopy(self.model)), trainable_only=True)


def _meta_copy(model: Any) -> Any:
    """A copy of `model` whose parameters and buffers live on the meta device (no storage is copied);
    tied weights stay tied. None where the model cannot be copied that way."""
    import torch

    memo: dict[int, Any] = {}
    for param in model.parameters():
        memo[id(param)] = torch.nn.Parameter(
            torch.empty_like(param, device="meta"), requires_grad=param.requires_grad
        )
    for buffer in model.buffers():
        memo[id(buffer)] = torch.empty_like(buffer, device="meta")
    try:
        return copy.deepcopy(model, memo)
    except Exception:
        return None


def fit_size(method_values: dict[str, Any], model: Any, target: int) -> Fit:
    """The size of the method `method_values` (the `method` config section) whose trainable-parameter count
    on `model` is the largest <= `target`. ConfigError where the method has no size knob or even its
    smallest size is over the budget."""
    import peftbench.methods  # noqa: F401  (registers every method)
    from peftbench.methods.registry import METHODS

    name = method_values.get("name")
    if name not in METHODS:
        raise bad_value("method", name, sorted(METHODS))
    knob = METHODS[name].size_knob
    if knob is None:
        with_knob = sorted(m for m, c in METHODS.items() if c.size_knob)
        raise bad_value(
            "method (for budget.trainable_params)", name, f"a method with a size knob: {with_knob}"
        )
    counter = _Counter(model, dict(method_values), knob)
    smallest = counter(1)
    if smallest > target:
        raise ConfigError(
            f"budget.trainable_params={target:,} is below {name}'s smallest size ({knob}=1 trains "
            f"{int(smallest):,} parameters on this model); accepted: an integer >= {int(smallest):,}"
        )
    slope = counter(2) - smallest
    guess = 1 + int((target - smallest) // slope) if math.isfinite(slope) and slope > 0 else None
    value = largest_within(counter, target, guess)
    above = counter(value + 1)
    return Fit(
        method=name,
        knob=knob,
        value=value,
        trainable=int(counter(value)),
        next_trainable=int(above) if math.isfinite(above) else None,
        target=target,
        counted_on=counter.counted_on,
    )


def budget_target(cfg: DictConfig) -> int | None:
    """`budget.trainable_params` (None: no parameter budget); ConfigError for anything but an int >= 1."""
    budget = cfg.get("budget")
    target = budget.get("trainable_params") if budget is not None else None
    if target is None:
        return None
    return check_int("budget.trainable_params", target, accepted="an integer >= 1 (e.g. 1_000_000), or null")


def apply_budget(cfg: DictConfig) -> Fit | None:
    """The run-time hook (before the method is built): with `budget.trainable_params` set, set the method's
    size knob in `cfg` to the fitted value and record the fit under `budget.fit`. A method without a size
    knob keeps its configuration and gets `budget.fit.matched: false`."""
    import torch

    import peftbench.methods  # noqa: F401
    from peftbench.methods.registry import METHODS
    from peftbench.models import load_model
    from peftbench.validation import check_method_types

    target = budget_target(cfg)
    if target is None:
        return None
    values = OmegaConf.to_container(cfg.method, resolve=True)
    cls = METHODS.get(values.get("name"))  # type: ignore[union-attr]
    if cls is None:
        return None  # validate_config names the unknown method
    if cls.size_knob is None:
        log.warning("budget: method=%s has no size knob; it is not budget-matched", cls.name)
        with open_dict(cfg):
            cfg.budget.fit = {"matched": False, "method": cls.name, "knob": None, "target": target}
        return None
    check_method_types(values)  # type: ignore[arg-type]  (one-line errors before any size is tried)
    with torch.random.fork_rng(devices=[]):  # adapters built while counting must not move the run's RNG
        model, _ = load_model(cfg.model)
        fit = fit_size(values, model, target)  # type: ignore[arg-type]
        del model
    log.info(
        "budget: %s %s=%d trains %s parameters (<= %s)",
        fit.method,
        fit.knob,
        fit.value,
        f"{fit.trainable:,}",
        f"{target:,}",
    )
    with open_dict(cfg):
        cfg.method[fit.knob] = fit.value
        cfg.budget.fit = {"matched": True, **asdict(fit)}
    return fit


# ----- the report's statement ----------------------------------------------------------------------------
def param_budget(records: list[Record]) -> dict[str, Any]:
    """What the study's ok runs say about their parameter budget: the target (None: no budget; a list when
    runs differ) and per method the chosen knob value and its trainable count, or `matched: false`."""
    targets = sorted({_fit(r).get("target") for r in records} - {None})
    methods: dict[str, dict[str, Any]] = {}
    for r in records:
        fit = _fit(r)
        if fit:
            entry = {k: fit.get(k) for k in ("matched", "knob", "value", "trainable", "next_trainable")}
            methods.setdefault(str(r.method), entry)
    target = targets[0] if len(targets) == 1 else (targets or None)
    return {"target": target, "methods": methods}


def _fit(record: Record) -> dict[str, Any]:
    budget = (record.config or {}).get("budget") or {}
    fit = budget.get("fit") if isinstance(budget, dict) else None
    return fit if isinstance(fit, dict) else {}


def budget_statement(pb: dict[str, Any] | None) -> str:
    """One line for the report's Budget section."""
    if not pb or pb.get("target") is None:
        return "Trainable-parameter budget: none (each method at its configured size)."
    target = pb["target"]
    shown = f"{target:,}" if isinstance(target, int) else " / ".join(f"{t:,}" for t in target)
    matched, unmatched = [], []
    for method, e in sorted(pb["methods"].items()):
        if e.get("matched"):
            matched.append(f"{method} {e['knob']}={e['value']} ({e['trainable']:,})")
        else:
            unmatched.append(method)
    text = f"Trainable-parameter budget: <= {shown} per method, size knob chosen on the model"
    text += (": " + ", ".join(matched)) if matched else ""
    if unmatched:
        text += f"; not budget-matched (no size knob): {', '.join(unmatched)}"
    return text + "."
