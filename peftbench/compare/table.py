"""Records -> one row per method: seeds, score mean ± 95% CI, paired delta vs a baseline, cost columns."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from peftbench.budget import param_budget
from peftbench.compare.claims import evaluate_claims
from peftbench.compare.environments import ENV_COSTS, costs_by_env, study_environments
from peftbench.compare.stats import Estimate, PairedTest, mean_ci, paired_test, pareto_front
from peftbench.errors import ConfigError, bad_value, is_number
from peftbench.record import Record, load_record, read_records

DEFAULT_BASELINE = "lora"
# Cost axes of the Pareto fronts: (key in MethodRow, axis label).
COSTS = {
    "trainable": "trainable parameters",
    "peak_memory_bytes": "peak training memory (bytes)",
    "step_s": "time per train step (s)",
}


@dataclass
class MethodRow:
    """One method's aggregate over its seeds. Cost columns are seed means (None when not recorded); time
    and memory (`ENV_COSTS`) are those of the study's reference environment E1 when its runs ran in more
    than one environment (compare/environments.py), each environment's in `costs_by_env`."""

    method: str
    seeds_ok: list[int]
    seeds_failed: list[int]
    score: Estimate | None
    delta: PairedTest | None
    metrics: dict[str, Estimate]
    before: Estimate | None
    trainable: float | None = None
    trainable_percent: float | None = None
    adapter_bytes: float | None = None
    base_modified: bool | None = None
    peak_memory_bytes: float | None = None
    step_s: float | None = None
    tokens_per_s: float | None = None
    total_s: float | None = None
    steps: float | None = None
    train_tokens: float | None = None
    lr: float | None = None
    method_config: dict[str, Any] = field(default_factory=dict)
    on_front: dict[str, bool] = field(default_factory=dict)
    rollouts: dict[str, Estimate] = field(default_factory=dict)  # RL from feedback (record.Rollouts)
    envs: list[str] = field(default_factory=list)  # environment ids of its ok runs
    costs_by_env: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class StudySummary:
    """Everything the report shows, in numbers (summary.json is `to_dict()`)."""

    study: str
    metric: str
    higher_is_better: bool
    baseline: str | None
    rows: list[MethodRow]
    failed: list[dict[str, Any]]
    budget: dict[str, Any]
    environment: dict[str, Any]
    environments: list[dict[str, Any]] = field(default_factory=list)  # E1 (most runs) first
    claims: list[dict[str, Any]] = field(default_factory=list)  # compare/claims.py, ClaimResult.to_dict()

    @property
    def mixed_environments(self) -> bool:
        """The ok runs ran in more than one environment: time and memory are split per environment."""
        return len(self.environments) > 1

    def to_dict(self) -> dict[str, Any]:
        return _finite(asdict(self))


def _finite(obj: Any) -> Any:
    """NaN/inf -> None, so summary.json is valid JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def higher_is_better(metric: str) -> bool:
    """Losses and perplexities go down; every other metric (ROUGE, accuracy, F1) goes up."""
    return not any(word in metric for word in ("loss", "perplexity", "error"))


def load_records(directory: Path | str) -> list[Record]:
    """The records of one study under `directory`, deduplicated by run_id; ConfigError on bad input."""
    directory = Path(directory)
    if not directory.is_dir():
        raise bad_value("dir", str(directory), "an existing results or study directory")
    unique = {r.run_id: r for r in read_records(directory)}
    if not unique:
        raise bad_value("dir", str(directory), "a directory holding run records (<run_id>.json)")
    studies = sorted({str(r.study) for r in unique.values()})
    if len(studies) > 1:
        raise bad_value("dir", str(directory), "one study's directory; it holds " + ", ".join(studies))
    return sorted(unique.values(), key=lambda r: (str(r.method), r.seed or 0, r.run_id))


def as_records(records: list[Record] | list[dict[str, Any]]) -> list[Record]:
    """Records as read (`Record`), or their JSON form (dicts, any readable version), as `Record`s."""
    return [r if isinstance(r, Record) else load_record(r) for r in records]


def metrics_of(records: list[Record]) -> list[str]:
    return sorted({k for r in records if r.ok for k in r.metrics})


def methods_of(records: list[Record]) -> list[str]:
    return sorted({str(r.method) for r in records if r.ok})


def _get(value: Any, *path: str) -> Any:
    """`value.a.b` (attributes of a record's parts, keys of its dicts), None where a step is missing."""
    for key in path:
        if value is None:
            return None
        value = value.get(key) if isinstance(value, dict) else getattr(value, key, None)
    return value


def _mean(values: list[Any]) -> float | None:
    xs = [float(v) for v in values if is_number(v)]
    return math.fsum(xs) / len(xs) if xs else None


def _latest_per_seed(records: list[Record]) -> dict[int, Record]:
    """One ok record per seed: a re-run of the same seed replaces the earlier one (later run_dir wins)."""
    by_seed: dict[int, Record] = {}
    for r in sorted(records, key=lambda r: str(r.run_dir or "")):
        by_seed[int(r.seed or 0)] = r
    return by_seed


def _row(method: str, ok: dict[int, Record], failed: list[int], metric: str) -> MethodRow:
    recs = list(ok.values())
    test_keys = sorted({k for r in recs for k in r.metrics if k.startswith("test/")} | {metric})
    metrics = {k: e for k in test_keys if (e := mean_ci([r.metrics.get(k) for r in recs]))}
    before_key = metric.replace("test/", "test_before/", 1)
    modified = {_get(r, "params", "base_modified") for r in recs} - {None}
    return MethodRow(
        method=method,
        seeds_ok=sorted(ok),
        seeds_failed=sorted(set(failed) - set(ok)),
        score=metrics.get(metric),
        delta=None,
        metrics=metrics,
        before=mean_ci([r.metrics.get(before_key) for r in recs]) if before_key != metric else None,
        trainable=_mean([_get(r, "params", "trainable") for r in recs]),
        trainable_percent=_mean([_get(r, "params", "trainable_percent") for r in recs]),
        adapter_bytes=_mean([_get(r, "params", "adapter_bytes") for r in recs]),
        base_modified=any(modified) if modified else None,
        peak_memory_bytes=_mean([_get(r, "memory", "peak_train_bytes") for r in recs]),
        step_s=_mean([_get(r, "time", "train_step_s") for r in recs]),
        tokens_per_s=_mean([r.tokens_per_s for r in recs]),
        total_s=_mean([_get(r, "time", "total_s") for r in recs]),
        steps=_mean([r.steps for r in recs]),
        train_tokens=_mean([r.train_tokens for r in recs]),
        lr=_mean([_get(r, "config", "optim", "lr") for r in recs]),
        method_config=dict(recs[0].method_config or {}) if recs else {},
        rollouts=_rollouts(recs),
    )


#: RL from feedback's summary fields (record.Rollouts) the report shows, in order
ROLLOUT_FIELDS = (
    "reward_first",
    "reward_last",
    "kl_last",
    "zero_spread_groups",
    "clip_fraction",
    "completion_length",
    "generation_tokens_per_s",
    "generation_share",
)


def _rollouts(recs: list[Record]) -> dict[str, Estimate]:
    """Seed means (± 95% CI) of the RL summary fields, for runs of a task that samples rollouts."""
    if not any(r.rollouts for r in recs):
        return {}
    out = {}
    for key in ROLLOUT_FIELDS:
        estimate = mean_ci([_get(r, "rollouts", key) for r in recs if r.rollouts])
        if estimate:
            out[key] = estimate
    return out


def _distinct(values: list[Any]) -> list[Any]:
    return sorted({v for v in values if v is not None}, key=str)


def budget(records: list[Record]) -> dict[str, Any]:
    """The training budget every ok run was given, from the resolved configs (lists when they differ)."""
    ok = [r for r in records if r.ok]
    spec = {
        "max_steps": ("config", "trainer", "max_steps"),
        "max_epochs": ("config", "trainer", "max_epochs"),
        "batch_size": ("config", "batch_size"),
        "accumulate_grad_batches": ("config", "trainer", "accumulate_grad_batches"),
        "precision": ("config", "trainer", "precision"),
        "train_examples": ("data", "train"),
        "steps_taken": ("steps",),
        "train_tokens": ("train_tokens",),
    }
    out: dict[str, Any] = {}
    for name, path in spec.items():
        values = _distinct([_get(r, *path) for r in ok])
        out[name] = values[0] if len(values) == 1 else values or None
    out["equal"] = all(not isinstance(out[k], list) for k in ("max_steps", "batch_size", "steps_taken"))
    out["models"] = _distinct([r.model for r in records])
    out["tasks"] = _distinct([r.task for r in records])
    out["trainable_params"] = param_budget(ok)  # target and each method's chosen size (peftbench/budget.py)
    return out


def environment(records: list[Record]) -> dict[str, Any]:
    """Devices, hosts, commits and package versions of the runs (each value joined when they differ)."""
    ok = [r for r in records if r.ok] or records
    devices = _distinct([_get(r, "memory", "device_name") or _get(r, "env", "device") for r in ok])
    versions: dict[str, list[Any]] = defaultdict(list)
    for r in ok:
        for k, v in (_get(r, "env", "versions") or {}).items():
            versions[k].append(v)
    return {
        "devices": devices,
        "hosts": _distinct([_get(r, "env", "host") for r in ok]),
        "git_commits": _distinct([_get(r, "env", "git_commit") for r in ok]),
        "versions": {k: " / ".join(map(str, _distinct(v))) or None for k, v in sorted(versions.items())},
    }


def summarize(
    records: list[Record] | list[dict[str, Any]], metric: str | None = None, baseline: str | None = None
) -> StudySummary:
    """Aggregate one study's records. `metric` defaults to the records' primary metric, `baseline` to
    lora when present. ConfigError (naming the accepted values) for an unknown metric or baseline."""
    records = as_records(records)
    ok = [r for r in records if r.ok]
    methods, metrics = methods_of(records), metrics_of(records)
    if not ok:
        raise bad_value("dir", "(all runs failed)", "a study with at least one successful run")
    metric = metric or max({str(r.primary_metric) for r in ok}, key=[r.primary_metric for r in ok].count)
    if metric not in metrics:
        raise bad_value("metric", metric, metrics)
    if baseline is not None and baseline not in methods:
        raise bad_value("baseline", baseline, methods)
    baseline = baseline or (DEFAULT_BASELINE if DEFAULT_BASELINE in methods else None)
    failed_seeds: dict[str, list[int]] = defaultdict(list)
    for r in records:
        if not r.ok:
            failed_seeds[str(r.method)].append(r.seed)  # type: ignore[arg-type]
    envs, run_env = study_environments(records)
    rows, by_method = [], {}
    for method in sorted(set(methods) | set(failed_seeds)):
        by_seed = by_method[method] = _latest_per_seed([r for r in ok if r.method == method])
        row = _row(method, by_seed, failed_seeds.get(method, []), metric)
        row.costs_by_env = costs_by_env(list(by_seed.values()), run_env)
        row.envs = list(row.costs_by_env)
        if len(envs) > 1:  # never average time or memory over environments: E1's figures, or none
            reference = row.costs_by_env.get(envs[0].id, {})
            for name in ENV_COSTS:
                setattr(row, name, reference.get(name))
        rows.append(row)
    _add_deltas(rows, baseline, metric, ok)
    up = higher_is_better(metric)
    for key in COSTS:
        scores = [r.score.mean if r.score else None for r in rows]
        for row, on in zip(rows, pareto_front([getattr(r, key) for r in rows], scores, up), strict=True):
            row.on_front[key] = on
    sign = -1.0 if up else 1.0
    rows.sort(key=lambda r: (r.score is None, sign * r.score.mean if r.score else 0.0, r.method))
    failed = [
        {"method": r.method, "seed": r.seed, "run_id": r.run_id, "error": r.error}
        for r in records
        if not r.ok
    ]
    study = str(records[0].study)
    return StudySummary(
        study,
        metric,
        up,
        baseline,
        rows,
        failed,
        budget(records),
        environment(records),
        [e.to_dict() for e in envs],
        [c.to_dict() for c in evaluate_claims(by_method, metric, up, run_env)],
    )


def _add_deltas(rows: list[MethodRow], baseline: str | None, metric: str, ok: list[Record]) -> None:
    if baseline is None:
        return

    def scores(method: str) -> dict[int, float]:
        by_seed = _latest_per_seed([r for r in ok if r.method == method])
        return {s: float(r.metrics[metric]) for s, r in by_seed.items() if metric in r.metrics}

    base = scores(baseline)
    for row in rows:
        if row.method != baseline:
            row.delta = paired_test(scores(row.method), base)


def load_study(
    directory: Path | str, metric: str | None = None, baseline: str | None = None
) -> tuple[list[Record], StudySummary]:
    """Read a study directory and aggregate it: `(records, summary)`."""
    records = load_records(directory)
    return records, summarize(records, metric, baseline)


def to_frame(summary: StudySummary) -> Any:
    """The per-method numbers as a pandas DataFrame (for notebooks)."""
    import pandas as pd

    rows = []
    for r in summary.rows:
        rows.append(
            {
                "method": r.method,
                "seeds_ok": len(r.seeds_ok),
                "seeds_failed": len(r.seeds_failed),
                summary.metric: r.score.mean if r.score else None,
                "ci95": r.score.half_width if r.score else None,
                "delta": r.delta.delta.mean if r.delta else None,
                "p": r.delta.p if r.delta else None,
                "trainable": r.trainable,
                "trainable_%": r.trainable_percent,
                "peak_memory_MiB": r.peak_memory_bytes / 2**20 if r.peak_memory_bytes else None,
                "step_s": r.step_s,
                "tokens_per_s": r.tokens_per_s,
            }
        )
    return pd.DataFrame(rows).set_index("method")


__all__ = ["COSTS", "ConfigError", "MethodRow", "StudySummary", "load_records", "load_study", "summarize"]
