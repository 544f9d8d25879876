"""Sweeps (`bench.sweep`): the selected methods again over sequence lengths, ranks and model shapes, each
axis varying one thing from the base configuration. `check_sweep` validates the section before anything
runs; `run_sweeps` measures every point with `bench_method` and returns the points the report plots."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from peftbench.bench.batches import make_batches
from peftbench.bench.measure import bench_method, summary_values
from peftbench.bench.memory_split import release_cpu_memory
from peftbench.bench.settings import CONF_DIR, Settings, resolve_methods
from peftbench.bench.sides import PretrainedDir
from peftbench.bench.timing import ModelShape
from peftbench.errors import bad_value

SWEEP_AXES = ("seq_len", "r", "models")


def load_model_config(name: str) -> DictConfig:
    options = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
    if name not in options:
        raise bad_value("bench.sweep.models entry", name, options)
    return OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml")  # type: ignore[return-value]


def check_sweep(cfg: DictConfig) -> dict[str, Any]:
    sweep = OmegaConf.to_container(cfg.bench.get("sweep") or {}, resolve=True)
    assert isinstance(sweep, dict)
    if not sweep.get("enabled", False):
        return {"enabled": False}
    for axis in SWEEP_AXES:
        values = sweep.get(axis) or []
        if not isinstance(values, list):
            raise bad_value(f"bench.sweep.{axis}", values, "a list")
        if axis != "models" and any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
            raise bad_value(f"bench.sweep.{axis}", values, "a list of integers >= 1")
        sweep[axis] = values
    for name in sweep["models"]:
        load_model_config(name)
    sweep["methods"] = list(sweep.get("methods") or [])
    resolve_methods(cfg, sweep["methods"])  # fail before anything runs
    return sweep


def _point(entry: dict[str, Any], axis: str, value: Any, model_name: str, params: int) -> dict[str, Any]:
    return {
        "axis": axis,
        "value": value,
        "model": model_name,
        "model_params": params,
        "method": entry["method"],
        "peftbench": summary_values(entry["peftbench"]),
        "peft": summary_values(entry["peft"]),
        "peft_missing": entry["peft_missing"],
        "errors": {
            impl: entry[impl]["error"]
            for impl in ("peftbench", "peft")
            if entry.get(impl) and entry[impl].get("status") == "failed"
        },
        "ratios": entry["ratios"],
    }


def run_sweeps(
    cfg: DictConfig, sweep: dict[str, Any], base: nn.Module, settings: Settings, log: Callable[[str], None]
) -> dict[str, list[dict[str, Any]]]:
    """Each axis varies one thing from the base configuration: seq_len, r (methods with a rank), model."""
    from peftbench.models import load_model

    out: dict[str, list[dict[str, Any]]] = {}
    names = sweep["methods"]
    model_name = str(cfg.model.name)
    shape = ModelShape.of(base)
    pretrained = PretrainedDir(base, cfg.model)
    try:
        points = []
        for seq_len in sweep["seq_len"]:
            short = None if settings.min_seq_len is None else min(settings.min_seq_len, seq_len)
            s = replace(settings, seq_len=seq_len, min_seq_len=short)
            batch = make_batches(base.config.vocab_size, s)
            for method in resolve_methods(cfg, names, settings.r):
                log(f"sweep seq_len={seq_len}: {method.name}")
                entry = bench_method(method, base, batch, s, shape, pretrained)
                points.append(_point(entry, "seq_len", seq_len, model_name, shape.total_params))
        out["seq_len"] = points
        points = []
        batch = make_batches(base.config.vocab_size, settings)
        for r in sweep["r"]:
            for method in resolve_methods(cfg, names, r):
                if not hasattr(method, "r"):
                    continue
                log(f"sweep r={r}: {method.name}")
                entry = bench_method(method, base, batch, settings, shape, pretrained)
                points.append(_point(entry, "r", r, model_name, shape.total_params))
        out["r"] = points
    finally:
        pretrained.cleanup()
    points = []
    for name in sweep["models"]:
        model_cfg = load_model_config(name)
        other, _ = load_model(model_cfg)
        other_shape = ModelShape.of(other)
        batch = make_batches(other.config.vocab_size, settings)
        other_dir = PretrainedDir(other, model_cfg)
        try:
            for method in resolve_methods(cfg, names, settings.r):
                log(f"sweep model={name}: {method.name}")
                entry = bench_method(method, other, batch, settings, other_shape, other_dir)
                points.append(_point(entry, "models", name, str(model_cfg.name), other_shape.total_params))
        finally:
            other_dir.cleanup()
            del other
            release_cpu_memory()
    out["models"] = points
    return {k: v for k, v in out.items() if v}
