"""Which machine each run ran on, so that time and memory are only compared within one environment.

A time per step measured with 1 thread on an emulated-bf16 CPU and one measured with 2 threads on another
CPU are different quantities; a column that averages them means nothing. The environment key of a run is
what decides its speed and memory: the CPU model, whether that CPU computes bf16 natively (otherwise bf16
is emulated, 10-100x slower: peftbench/hardware.py), torch's thread count and the GPU. Records of
version 1 lack the CPU model and flags; their key says "not recorded" for those parts, so runs that
differ in what *was* recorded (their threads) are still kept apart.

A run that started while the machine's 1-minute load average exceeded its cores (other work was running)
is flagged as loaded: its time is an upper bound, not a measurement of the method.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

from peftbench.hardware import NATIVE_BF16_FLAGS
from peftbench.record import Record

#: the cost figures that depend on the environment: (name, path into the record)
ENV_COSTS: dict[str, tuple[str, ...]] = {
    "peak_memory_bytes": ("memory", "peak_train_bytes"),
    "step_s": ("time", "train_step_s"),
    "tokens_per_s": ("tokens_per_s",),
    "total_s": ("time", "total_s"),
}


@dataclass(frozen=True, order=True)
class EnvKey:
    """What decides a run's speed and memory. None: the record does not say."""

    cpu_model: str | None
    native_bf16: bool | None
    threads: int | None
    gpu: str | None

    def describe(self) -> str:
        """One line, e.g. `AMD EPYC, bf16 emulated, 2 threads, no GPU`."""
        bf16 = {True: "native bf16", False: "bf16 emulated", None: "bf16 support not recorded"}
        return ", ".join(
            [
                self.cpu_model or "CPU model not recorded",
                bf16[self.native_bf16],
                f"{self.threads} thread{'s' * (self.threads != 1)}"
                if self.threads
                else "threads not recorded",
                f"GPU {self.gpu}" if self.gpu else "no GPU",
            ]
        )


def _env(record: Record) -> Any:
    return record.env


def env_key(record: Record) -> EnvKey:
    """The environment key of one run (parts missing from old records read as None)."""
    env = _env(record)
    if env is None:
        return EnvKey(None, None, None, None)
    flags = env.cpu_flags or {}
    native = any(flags.get(f) for f in NATIVE_BF16_FLAGS) if flags else None
    gpu = env.gpu or (record.memory.device_name if record.memory else None)
    return EnvKey(env.cpu_model, native, env.cpu_threads, gpu)


def cores(record: Record) -> int | None:
    """The cores the load average is compared with: `env.cpu_count` where the record has it, else the
    threads the run used (peftbench runs one thread per core)."""
    env = _env(record)
    if env is None:
        return None
    return env.cpu_count or env.cpu_threads


def loaded(record: Record) -> bool | None:
    """True when the run started with a 1-minute load average above its cores; None when not recorded."""
    env = _env(record)
    load = env.load_avg_1m if env is not None else None
    n = cores(record)
    if load is None or not n or not math.isfinite(load):
        return None
    return load > n


@dataclass
class Environment:
    """One environment of a study: its short id (E1 has the most runs), key and counts."""

    id: str
    key: EnvKey
    runs: int
    loaded_runs: int
    load_unknown_runs: int

    @property
    def description(self) -> str:
        return self.key.describe()

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "description": self.description,
            "cpu_model": self.key.cpu_model,
            "native_bf16": self.key.native_bf16,
            "threads": self.key.threads,
            "gpu": self.key.gpu,
            "runs": self.runs,
            "loaded_runs": self.loaded_runs,
            "load_unknown_runs": self.load_unknown_runs,
        }


def study_environments(records: list[Record]) -> tuple[list[Environment], dict[str, str]]:
    """The environments of a study's ok runs, most runs first (E1, E2, ...), and run_id -> env id."""
    ok = [r for r in records if r.ok]
    counts = Counter(env_key(r) for r in ok)
    order = sorted(counts, key=lambda k: (-counts[k], k.describe()))
    ids = {key: f"E{i + 1}" for i, key in enumerate(order)}
    envs = [
        Environment(
            id=ids[key],
            key=key,
            runs=counts[key],
            loaded_runs=sum(1 for r in ok if env_key(r) == key and loaded(r)),
            load_unknown_runs=sum(1 for r in ok if env_key(r) == key and loaded(r) is None),
        )
        for key in order
    ]
    return envs, {r.run_id: ids[env_key(r)] for r in ok}


def _get(value: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        value = getattr(value, key, None) if value is not None else None
    return value


def _mean(values: list[Any]) -> float | None:
    xs = [float(v) for v in values if isinstance(v, int | float) and math.isfinite(float(v))]
    return math.fsum(xs) / len(xs) if xs else None


def costs_by_env(records: list[Record], run_env: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Per environment id: the mean of each `ENV_COSTS` figure over these (one method's) ok runs, the run
    count `n` and `loaded` (how many of them started under load)."""
    grouped: dict[str, list[Record]] = {}
    for r in records:
        if r.ok and r.run_id in run_env:
            grouped.setdefault(run_env[r.run_id], []).append(r)
    out: dict[str, dict[str, Any]] = {}
    for env_id in sorted(grouped, key=lambda e: int(e[1:])):
        recs = grouped[env_id]
        out[env_id] = {name: _mean([_get(r, path) for r in recs]) for name, path in ENV_COSTS.items()}
        out[env_id]["n"] = len(recs)
        out[env_id]["loaded"] = sum(1 for r in recs if loaded(r))
    return out


__all__ = ["ENV_COSTS", "EnvKey", "Environment", "costs_by_env", "env_key", "loaded", "study_environments"]
