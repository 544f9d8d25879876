"""W&B dashboards as code: a study's workspace, built from its records with `wandb-workspaces`.

`dashboard_spec(records, summary)` describes the workspace as plain data (written beside the report as
`dashboard.json`, whether or not W&B is reachable): the project the study's runs logged to, runs grouped
by method, and four sections:

- **Score vs cost**: the primary test score against the trainable parameters (log x), and per method;
- **Learning curves**: train loss, validation loss and the validation score per step, mean over a
  method's seeds with a min-max band;
- **Memory and time**: the memory split (weights, gradients + optimizer state, activations + rest;
  compare/memory_split.py) and the time per step, per method;
- **Sweeps**: a parallel-coordinates panel from the hyperparameters that vary over the study's runs
  (learning rate, rank, ...) to the validation and test scores.

Every panel names a metric as `{"source": history | summary | config, "key": ...}`, and `check_spec`
refuses one that the runs do not log (compare/wandb_metrics.py says what they log). `build_workspace`
turns the spec into a `wandb_workspaces` Workspace; `save_dashboard` saves it when logged in
(peftbench/loggers.py `wandb_login`).
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from peftbench.compare.table import StudySummary
from peftbench.compare.wandb_metrics import logged_metrics
from peftbench.errors import ConfigError
from peftbench.files import atomic_write_json
from peftbench.record import Record

SPEC_FILE = "dashboard.json"
GROUP_KEY = "method.name"  # conf/logger/wandb.yaml: group = method name; the config carries it too
#: hyperparameters offered to the sweep panel when they vary over the runs (and the runs log them)
SWEEP_CANDIDATES = (
    "optim.lr",
    "optim.weight_decay",
    "optim.warmup_ratio",
    "batch_size",
    "trainer.max_steps",
    "method.r",
    "method.alpha",
    "method.lr_ratio",
    "method.num_virtual_tokens",
    "method.bottleneck_size",
    "budget.trainable_params",
)
SPLIT_KEYS = ("memory/weights_bytes", "memory/grads_optimizer_bytes", "memory/activations_rest_bytes")


def _ref(source: str, key: str) -> dict[str, str]:
    return {"source": source, "key": key}


def _config_value(record: Record, key: str) -> Any:
    value: Any = record.config or {}
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _project(records: list[Record], study: str) -> str:
    names = Counter(str(p) for r in records if (p := _config_value(r, "logger.project")))
    return names.most_common(1)[0][0] if names else f"peftbench-{study}"


def _varying(records: list[Record], known: set[str]) -> list[str]:
    ok = [r for r in records if r.ok]
    out = []
    for key in SWEEP_CANDIDATES:
        values = {repr(v) for r in ok if (v := _config_value(r, key)) is not None}  # set by the runs
        if key in known and len(values) > 1:
            out.append(key)
    return out


def dashboard_spec(records: list[Record], summary: StudySummary) -> dict[str, Any]:
    """The workspace of one study, as plain data (JSON-ready)."""
    metric = summary.metric
    val_metric = metric.replace("test/", "val/", 1)
    known = logged_metrics(records)
    val_keys = [k for k in ("val/loss", val_metric) if k in known["history"]]
    sweep = ["optim.lr", *[k for k in _varying(records, known["config"]) if k != "optim.lr"]]
    group = {"groupby": _ref("config", GROUP_KEY), "aggregate": "mean", "band": "minmax"}
    sections = [
        {
            "name": "Score vs cost",
            "panels": [
                {
                    "type": "scatter",
                    "title": f"{metric} vs trainable parameters",
                    "x": _ref("summary", "params/trainable"),
                    "y": _ref("summary", metric),
                    "log_x": True,
                },
                {
                    "type": "bar",
                    "title": f"{metric} per method",
                    "metrics": [_ref("summary", metric)],
                    **group,
                },
            ],
        },
        {
            "name": "Learning curves",
            "panels": [
                {
                    "type": "line",
                    "title": key,
                    "x": _ref("history", "trainer/global_step"),
                    "y": [_ref("history", key)],
                    **group,
                }
                for key in ("train/loss", *val_keys)
            ],
        },
        {
            "name": "Memory and time",
            "panels": [
                {
                    "type": "bar",
                    "title": "Memory split: weights, gradients + optimizer, activations + rest (bytes)",
                    "metrics": [_ref("summary", k) for k in SPLIT_KEYS],
                    **group,
                },
                {
                    "type": "bar",
                    "title": "Time per optimizer step (s)",
                    "metrics": [_ref("summary", "time/train_step_s")],
                    **group,
                },
            ],
        },
        {
            "name": "Sweeps",
            "panels": [
                {
                    "type": "parallel",
                    "title": "Hyperparameters -> scores",
                    "columns": [
                        _ref("config", GROUP_KEY),
                        *(_ref("config", k) for k in sweep),
                        *(_ref("summary", k) for k in (val_metric, metric) if k in known["summary"]),
                    ],
                }
            ],
        },
    ]
    return {
        "study": summary.study,
        "entity": os.environ.get("WANDB_ENTITY") or None,
        "project": _project(records, summary.study),
        "name": f"{summary.study}: peftbench comparison",
        "group_by": _ref("config", GROUP_KEY),
        "sections": sections,
    }


def metric_refs(spec: dict[str, Any]) -> list[dict[str, str]]:
    """Every metric a spec names (group keys, axes, bars, columns)."""
    refs = [spec["group_by"]]
    for section in spec["sections"]:
        for panel in section["panels"]:
            for field in ("x", "y", "groupby"):
                value = panel.get(field)
                refs += value if isinstance(value, list) else [value] if value else []
            refs += panel.get("metrics", []) + panel.get("columns", [])
    return refs


def unknown_metrics(spec: dict[str, Any], known: dict[str, set[str]]) -> list[str]:
    """`source:key` of each metric the spec names that the runs do not log."""
    return sorted(
        {
            f"{r['source']}:{r['key']}"
            for r in metric_refs(spec)
            if r["key"] not in known.get(r["source"], set())
        }
    )


def check_spec(spec: dict[str, Any], records: list[Record]) -> None:
    """ConfigError naming every panel metric these runs do not log to W&B."""
    unknown = unknown_metrics(spec, logged_metrics(records))
    if unknown:
        raise ConfigError(
            f"dashboard names metrics the runs do not log: {', '.join(unknown)}; accepted: the keys in "
            "peftbench/compare/wandb_metrics.py and the records' metrics and config"
        )


def write_spec(records: list[Record], summary: StudySummary, out_dir: Path) -> Path:
    """Check the study's dashboard spec and write it as `out_dir/dashboard.json`."""
    spec = dashboard_spec(records, summary)
    check_spec(spec, records)
    path = Path(out_dir) / SPEC_FILE
    atomic_write_json(path, spec)
    return path


def build_workspace(spec: dict[str, Any], entity: str) -> Any:
    """The spec as a `wandb_workspaces.workspaces.Workspace` (needs the `dashboards` extra; no network)."""
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
        from wandb_workspaces import expr
    except ImportError as err:
        raise ConfigError(
            "--wandb dashboards need wandb-workspaces; accepted: pip install 'peftbench[dashboards]'"
        ) from err

    def metric(ref: dict[str, str]) -> Any:
        return {"config": wr.Config, "summary": wr.SummaryMetric}.get(ref["source"], str)(ref["key"])

    def grouped(panel: dict[str, Any]) -> dict[str, Any]:
        return {
            "groupby": wr.Config(panel["groupby"]["key"]),
            "groupby_aggfunc": panel["aggregate"],
            "groupby_rangefunc": panel["band"],
        }

    def build(panel: dict[str, Any]) -> Any:
        kind, title = panel["type"], panel["title"]
        if kind == "line":
            return wr.LinePlot(
                title=title, x=panel["x"]["key"], y=[metric(m) for m in panel["y"]], **grouped(panel)
            )
        if kind == "scatter":
            return wr.ScatterPlot(
                title=title, x=metric(panel["x"]), y=metric(panel["y"]), log_x=panel["log_x"]
            )
        if kind == "bar":
            return wr.BarPlot(title=title, metrics=[metric(m) for m in panel["metrics"]], **grouped(panel))
        if kind == "parallel":
            columns = [wr.ParallelCoordinatesPlotColumn(metric=metric(c)) for c in panel["columns"]]
            return wr.ParallelCoordinatesPlot(title=title, columns=columns)
        raise ConfigError(f"dashboard panel type {kind!r}; accepted: line, scatter, bar, parallel")

    sections = [
        ws.Section(name=s["name"], panels=[build(p) for p in s["panels"]], is_open=True)
        for s in spec["sections"]
    ]
    return ws.Workspace(
        entity=entity,
        project=spec["project"],
        name=spec["name"],
        sections=sections,
        runset_settings=ws.RunsetSettings(groupby=[expr.Config(spec["group_by"]["key"])]),
    )


def save_dashboard(spec: dict[str, Any]) -> str:
    """Save the workspace to the W&B server the user is logged in to; returns its URL."""
    import wandb

    entity = spec.get("entity") or wandb.Api().default_entity
    workspace = build_workspace(spec, entity)
    workspace.save()
    return str(workspace.url)


__all__ = [
    "SPEC_FILE",
    "build_workspace",
    "check_spec",
    "dashboard_spec",
    "metric_refs",
    "save_dashboard",
    "unknown_metrics",
    "write_spec",
]
