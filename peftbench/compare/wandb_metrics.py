"""What a peftbench run logs to Weights & Biases, in one place: the dashboards (compare/dashboard.py) may
only name these metrics, and tests/test_wandb_dashboard.py checks the list against a real offline run.

A run's W&B data has three parts:

- history (one value per step): what `PeftModule` logs with `self.log` (peftbench/module.py):
  `train/loss` and `train/tokens_per_s` per optimizer step, `val/<metric>` and `val/loss` at each
  validation, `test/<metric>` and `test/loss` once; Lightning adds `epoch` and `trainer/global_step`;
- summary (one value per run): the last of each history key, the record's metrics (train.py:
  `test/*`, `test_before/*`, `val/*`) and `run_summary(record)` below (parameters, memory split, time);
- config: the resolved Hydra config (`optim.lr`, `method.name`, `method.r`, ...), plus `params` (the
  record's parameter counts) from `log_hyperparams`.
"""

from __future__ import annotations

from typing import Any

from peftbench.compare.memory_split import memory_split
from peftbench.record import Record

#: history keys every training run logs whatever its task (module.py, Lightning)
TRAIN_HISTORY = ("train/loss", "train/tokens_per_s", "epoch", "trainer/global_step")
#: summary keys `run_summary` writes (when the record has the value)
RUN_SUMMARY = (
    "params/trainable",
    "params/trainable_percent",
    "params/weight_bytes",
    "memory/peak_train_bytes",
    "memory/weights_bytes",
    "memory/grads_optimizer_bytes",
    "memory/activations_rest_bytes",
    "time/train_step_s",
    "time/total_s",
    "tokens_per_s",
)


def run_summary(record: Record) -> dict[str, float]:
    """The record's parameter counts, memory split and timings as flat W&B summary keys (`RUN_SUMMARY`)."""
    params, timings = record.params, record.time
    values: dict[str, Any] = {
        "params/trainable": params.trainable if params else None,
        "params/trainable_percent": params.trainable_percent if params else None,
        "params/weight_bytes": params.weight_bytes if params else None,
        "time/train_step_s": timings.train_step_s if timings else None,
        "time/total_s": timings.total_s if timings else None,
        "tokens_per_s": record.tokens_per_s,
    }
    split = memory_split(record) or {}
    values["memory/peak_train_bytes"] = split.get("peak_train_bytes")
    for part in ("weights_bytes", "grads_optimizer_bytes", "activations_rest_bytes"):
        values[f"memory/{part}"] = split.get(part)
    return {k: float(v) for k, v in values.items() if isinstance(v, int | float)}


def _flat(config: dict[str, Any], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            keys |= _flat(value, f"{name}.")
        else:
            keys.add(name)
    return keys


def logged_metrics(records: list[Record]) -> dict[str, set[str]]:
    """`{"history", "summary", "config"}` -> the keys these runs logged to W&B (ok runs only)."""
    history, summary, config = set(TRAIN_HISTORY), set(RUN_SUMMARY), {"params.trainable"}
    for r in records:
        if not r.ok:
            continue
        for point in r.history.val if r.history else []:
            history |= {k for k in point if k.startswith("val/")}
        history |= {k for k in r.metrics if k.startswith("test/")}
        summary |= set(r.metrics)
        config |= _flat(r.config or {})
        if r.params is not None:
            config |= {f"params.{k}" for k in vars(r.params)}
    summary |= history  # W&B keeps the last value of each history key in the summary
    return {"history": history, "summary": summary, "config": config}


__all__ = ["RUN_SUMMARY", "TRAIN_HISTORY", "logged_metrics", "run_summary"]
