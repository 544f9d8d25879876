"""The benchmark's settings: the validated `bench` section (`Settings`, `parse_settings`) and the methods it
runs, each `conf/method/<name>.yaml` with `method_overrides` and the bench's rank applied and built before
anything runs (`method_options`, `method_config`, `resolve_methods`). A bad value is a one-line
`ConfigError`."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from peftbench.errors import ConfigError, bad_value

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

PRECISIONS = ("auto", "fp32", "bf16", "bf16-mixed")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Settings:
    """The validated `bench` section."""

    device: torch.device
    precision: str
    batch_size: int
    seq_len: int
    label_fraction: float
    warmup_steps: int
    timed_steps: int
    repeats: int
    r: int | None
    compile: bool
    gradient_checkpointing: bool
    min_seq_len: int | None
    group_by_length: bool
    peft: bool
    lr: float
    weight_decay: float
    seed: int
    threads: int | None
    out: str | None
    plot: bool

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype: bf16 for `bf16`, fp32 otherwise (`bf16-mixed` autocasts fp32 weights)."""
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.precision in ("bf16", "bf16-mixed") else None

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        if self.autocast_dtype is None:
            yield
        else:
            with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                yield

    @property
    def total_steps(self) -> int:
        """Optimizer steps per side: one measured step, the warm-up and the timed repeats."""
        return 1 + self.warmup_steps + self.timed_steps * self.repeats


def _int(section: DictConfig, key: str, low: int) -> int:
    value = section.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise bad_value(f"bench.{key}", value, f"an integer >= {low}")
    return value


def _bool(section: DictConfig, key: str) -> bool:
    value = section.get(key)
    if not isinstance(value, bool):
        raise bad_value(f"bench.{key}", value, "true, false")
    return value


def parse_settings(cfg: DictConfig) -> Settings:
    """`cfg.bench` as `Settings`; one-line `ConfigError` for a bad value."""
    section = cfg.bench
    device_name = section.get("device", "auto")
    if device_name not in DEVICES:
        raise bad_value("bench.device", device_name, DEVICES)
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    if device_name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("bench.device='cuda' is not valid here: torch sees no CUDA device; accepted: cpu")
    device = torch.device(device_name)
    precision = section.get("precision", "auto")
    if precision not in PRECISIONS:
        raise bad_value("bench.precision", precision, PRECISIONS)
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    fraction = section.get("label_fraction")
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction <= 1:
        raise bad_value("bench.label_fraction", fraction, "a number in (0, 1]")
    r = section.get("r")
    if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
        raise bad_value("bench.r", r, "null or an integer >= 1")
    lr = section.get("lr", 1e-4)
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not (lr > 0 and math.isfinite(lr)):
        raise bad_value("bench.lr", lr, "a finite number > 0")
    seed = cfg.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise bad_value("seed", seed, "an integer >= 0")
    threads = section.get("threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise bad_value("bench.threads", threads, "null or an integer >= 1")
    min_len = section.get("min_seq_len")
    seq_len = _int(section, "seq_len", 2)
    if min_len is not None and (
        isinstance(min_len, bool) or not isinstance(min_len, int) or not 2 <= min_len <= seq_len
    ):
        raise bad_value("bench.min_seq_len", min_len, f"null or an integer in [2, bench.seq_len={seq_len}]")
    out = section.get("out")
    return Settings(
        device=device,
        precision=precision,
        batch_size=_int(section, "batch_size", 1),
        seq_len=seq_len,
        label_fraction=float(fraction),
        warmup_steps=_int(section, "warmup_steps", 0),
        timed_steps=_int(section, "timed_steps", 1),
        repeats=_int(section, "repeats", 1),
        r=r,
        compile=_bool(section, "compile"),
        gradient_checkpointing=_bool(section, "gradient_checkpointing"),
        min_seq_len=min_len,
        group_by_length=_bool(section, "group_by_length"),
        peft=_bool(section, "peft"),
        lr=float(lr),
        weight_decay=float(section.get("weight_decay", 0.0)),
        seed=seed,
        threads=threads,
        out=str(out) if out else None,
        plot=_bool(section, "plot"),
    )


def method_options(conf_dir: Path = CONF_DIR) -> list[str]:
    return sorted(p.stem for p in (conf_dir / "method").glob("*.yaml"))


def method_config(name: Any, index: int, overrides: Any, r: int | None) -> Any:
    """The method `conf/method/<name>.yaml` describes, with `overrides` and the bench's rank applied."""
    from peftbench.methods import METHODS, build_method
    from peftbench.methods.registry import method_config_file

    accepted = method_options()
    if not isinstance(name, str) or name not in accepted:
        raise bad_value(f"methods[{index}]", name, accepted)
    section = method_config_file(CONF_DIR / "method" / f"{name}.yaml")
    if overrides:
        section.update(dict(overrides))
    cls = METHODS.get(section.get("name"))
    if r is not None and cls is not None and "r" in {f.name for f in _fields(cls)}:
        section["r"] = r
    return build_method(section)


def _fields(cls: type) -> tuple[Any, ...]:
    import dataclasses

    return dataclasses.fields(cls)


def resolve_methods(cfg: DictConfig, names: Any = None, r: int | None = None) -> list[Any]:
    """Every method of `methods` (or `names`), built and validated before anything runs."""
    names = cfg.get("methods") if names is None else names
    if isinstance(names, str):
        names = [names]
    if not names:
        raise bad_value("methods", names, "a non-empty list of " + ", ".join(method_options()))
    overrides = OmegaConf.to_container(cfg.get("method_overrides") or {}, resolve=True)
    if not isinstance(overrides, dict):
        raise bad_value("method_overrides", overrides, "a mapping from method name to hyper-parameters")
    unknown = sorted(set(overrides) - set(method_options()))
    if unknown:
        raise bad_value("method_overrides key", unknown[0], method_options())
    return [method_config(name, i, overrides.get(name), r) for i, name in enumerate(list(names))]
