"""The run record, typed: what one run leaves in `<run dir>/record.json` and in the results store
(`<results_dir>/<study>/<run_id>.json`), written and read only through this module.

A record is a `Record` (record version 2): who ran (`run_id`, `study`, `method`, `model`, `task`, `seed`),
how it ended (`status`: ok, failed or interrupted) and, for an ok run, what it measured (metrics, parameter
counts, memory, time, loss history). A stages run (peftbench/stages.py) adds `stages` and `forgetting`; a
failed run `failure`, `error` and maybe `traceback`; an interrupted one `signal`, `step` and `resume`.
`env` is the machine and the libraries the run ran on (peftbench/environment.py).

`load_record` reads versions 1 and 2: version 1 (the committed records under experiments/) has the same keys,
some of them missing in older runs (`seeds`, `padding`, `params.head_trainable`, `params.peft_adapter`);
they read as None. `read_records` reads every record under a directory, `write_record` writes one
(secrets redacted, atomically).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftbench.files import atomic_write_json
from peftbench.redaction import redact

RECORD_VERSION = 2
READABLE_VERSIONS = (1, 2)
RECORD_FILE = "record.json"


@dataclass
class Params:
    """Parameter counts (4-bit packed weights unpacked) and what the adapter weighs on disk."""

    total: int | None = None
    trainable: int | None = None
    trainable_percent: float | None = None  # of the base model's parameters
    weight_bytes: int | None = None
    base_modified: bool | None = None
    head_trainable: int | None = None  # a task head's trainable parameters (a classifier), in `trainable`
    projector_trainable: int | None = None  # an image model's trainable projector, in `trainable`
    adapter_bytes: int | None = None
    peft_adapter: str | None = None  # the adapter in HF PEFT's format, where the method has one


@dataclass
class Memory:
    peak_train_bytes: int | None = None
    device: str | None = None
    device_name: str | None = None  # the GPU's name, when trained on one


@dataclass
class Timings:
    """Seconds: the untuned score (or reused from the study's cache), fit, test, one step, the whole run."""

    eval_before_s: float | None = None
    eval_before_reused: bool | None = None
    fit_s: float | None = None
    test_s: float | None = None
    train_step_s: float | None = None
    total_s: float | None = None


@dataclass
class History:
    train_loss: list[list[float]] = field(default_factory=list)  # [step, loss] per optimizer step
    val: list[dict[str, Any]] = field(default_factory=list)  # {"step": n, "val/<metric>": x, ...}


@dataclass
class Rollouts:
    """RL from feedback (task=grpo/rloo/ppo, peftbench/tasks/reinforce.py): the statistics of every rollout
    batch (`history`, as logged under `train/`) and their summary. `reward_first` is the first batch's mean
    reward (sampled before any update), `reward_last` the last one's; `kl_last` the KL to the reference per
    completion on the last batch; `generation_share` the share of the training step time spent sampling."""

    batches: int = 0
    reward_first: float | None = None
    reward_last: float | None = None
    reward_std_last: float | None = None
    zero_spread_groups: float | None = None  # mean over batches
    kl_last: float | None = None
    clip_fraction: float | None = None  # mean over batches
    completion_length: float | None = None  # mean over batches
    generation_tokens_per_s: float | None = None  # mean over batches
    generation_share: float | None = None
    history: list[dict[str, float]] = field(default_factory=list)


def rollout_summary(history: list[dict[str, float]]) -> Rollouts | None:
    """`Rollouts` from the per-batch statistics of a task that steps the optimizer itself (None without)."""
    if not history:
        return None

    def mean(key: str) -> float | None:
        values = [float(h[key]) for h in history if key in h]
        return sum(values) / len(values) if values else None

    first, last = history[0], history[-1]
    step_s = sum(float(h.get("step_s", 0.0)) for h in history)
    generation_s = sum(float(h.get("generation_s", 0.0)) for h in history)
    return Rollouts(
        batches=len(history),
        reward_first=first.get("reward_mean"),
        reward_last=last.get("reward_mean"),
        reward_std_last=last.get("reward_std"),
        zero_spread_groups=mean("zero_spread_groups"),
        kl_last=last.get("kl"),
        clip_fraction=mean("clip_fraction"),
        completion_length=mean("completion_length"),
        generation_tokens_per_s=mean("generation_tokens_per_s"),
        generation_share=generation_s / step_s if step_s > 0 else None,
        history=[dict(h) for h in history],
    )


@dataclass
class Env:
    """The machine and libraries of a run, taken when it starts."""

    host: str | None = None
    device: str | None = None
    cpu_threads: int | None = None  # torch's intra-op threads
    git_commit: str | None = None
    versions: dict[str, str | None] = field(default_factory=dict)
    cpu_model: str | None = None
    cpu_flags: dict[str, bool] = field(default_factory=dict)  # avx512_bf16, amx_bf16, avx512f, avx2
    load_avg_1m: float | None = None
    gpu: str | None = None
    cpu_count: int | None = None  # logical CPUs (the load average is compared with it)


@dataclass
class StageResult:
    """One stage of a stages run, as the run's record lists it (its full record stays in its directory)."""

    index: int
    name: str
    task: str
    primary_metric: str
    metrics: dict[str, float]
    steps: int
    max_steps: int | None
    lr: float | None
    train_tokens: int
    time: Timings
    peak_train_bytes: int | None
    history: History
    data: dict[str, Any]
    run_dir: str
    resumed_from: dict[str, Any] | None = None
    metrics_after_last: dict[str, float] | None = None  # its task tested again after the last stage


@dataclass
class Forgetting:
    metric: str
    after_own_stage: float
    after_last_stage: float
    change: float  # after the last stage - after its own stage (negative: forgotten)


@dataclass
class Record:
    run_id: str
    status: str  # ok | failed | interrupted
    study: str | None = None
    method: str | None = None
    model: str | None = None
    task: str | None = None
    seed: int | None = None
    config: dict[str, Any] = field(default_factory=dict)
    env: Env | None = None
    # ----- an ok run
    seeds: dict[str, Any] | None = None
    primary_metric: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    params: Params | None = None
    memory: Memory | None = None
    time: Timings | None = None
    tokens_per_s: float | None = None
    steps: int | None = None
    train_tokens: int | None = None
    padding: dict[str, Any] | None = None
    history: History | None = None
    data: dict[str, Any] | None = None
    method_config: dict[str, Any] | None = None
    world_size: int | None = None
    resumed_from: dict[str, Any] | None = None
    checkpoints: str | None = None
    run_dir: str | None = None
    rollouts: Rollouts | None = None  # RL from feedback only
    # ----- a stages run
    stages: list[StageResult] | None = None
    forgetting: dict[str, Forgetting] | None = None
    # ----- a failed or interrupted run
    failure: str | None = None  # config | nan | oom | error
    error: str | None = None
    traceback: str | None = None
    checkpoint: str | None = None  # where it can resume from
    signal: str | None = None
    step: int | None = None
    resume: str | None = None  # the command that resumes it
    record_version: int = RECORD_VERSION

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: the fields of this record's status (those of the others left out)."""
        keep = set(_COMMON) | set(_BY_STATUS.get(self.status, ()))
        return {k: v for k, v in to_plain(self).items() if k in keep}


_COMMON = ("record_version", "run_id", "status", "study", "method", "model", "task", "seed", "config", "env")
_BY_STATUS = {
    "ok": (
        *("seeds", "primary_metric", "metrics", "params", "memory", "time", "tokens_per_s", "steps"),
        *("train_tokens", "padding", "history", "data", "method_config", "world_size", "resumed_from"),
        *("checkpoints", "run_dir", "stages", "forgetting", "rollouts"),
    ),
    "failed": ("failure", "error", "traceback", "checkpoint"),
    "interrupted": ("signal", "step", "checkpoint", "resume", "error"),
}
#: fields left out of the JSON when None, per class
_OPTIONAL = {
    "Record": ("env", "stages", "forgetting", "traceback", "rollouts"),
    "StageResult": ("metrics_after_last",),
    "Memory": ("device_name",),
    "Timings": ("eval_before_s", "eval_before_reused"),
}


def to_plain(obj: Any) -> Any:
    """Dataclasses as dicts (their optional fields left out when None), containers element-wise."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        optional = _OPTIONAL.get(type(obj).__name__, ())
        return {
            f.name: to_plain(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if not (f.name in optional and getattr(obj, f.name) is None)
        }
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_plain(v) for v in obj]
    return obj


# ----- reading --------------------------------------------------------------------------------------------
def _typed(hint: Any, value: Any) -> Any:
    """`value` (plain JSON) as `hint` says: dataclasses built field by field, containers element-wise."""
    if value is None:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return _typed(inner[0], value) if len(inner) == 1 else value
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return from_plain(hint, value)
    if origin is list and isinstance(value, list):
        (item,) = typing.get_args(hint) or (Any,)
        return [_typed(item, v) for v in value]
    if origin is dict and isinstance(value, dict):
        _, item = typing.get_args(hint) or (Any, Any)
        return {k: _typed(item, v) for k, v in value.items()}
    return value


def from_plain(cls: Any, values: dict[str, Any]) -> Any:
    """A dataclass of this module from its JSON form (unknown keys ignored, missing ones at their default)."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: _typed(hints[k], v) for k, v in values.items() if k in known})


def load_record(payload: dict[str, Any]) -> Record:
    """A record as written by any version this code reads (1 or 2); ValueError for anything else."""
    if not isinstance(payload, dict) or "run_id" not in payload or "status" not in payload:
        raise ValueError("not a run record (no run_id or status)")
    version = payload.get("record_version", 1)
    if version not in READABLE_VERSIONS:
        raise ValueError(f"record_version {version!r}; this peftbench reads {READABLE_VERSIONS}")
    record = from_plain(Record, {k: v for k, v in payload.items() if k != "record_version"})
    record.record_version = version
    return record


def read_record(path: Path) -> Record:
    return load_record(json.loads(Path(path).read_text()))


def read_records(directory: Path) -> list[Record]:
    """Every record under `directory` (recursively), skipping files that are not records."""
    records = []
    for path in sorted(Path(directory).rglob("*.json")):
        try:
            payload = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(payload, dict) and "record_version" in payload and "run_id" in payload:
            try:
                records.append(load_record(payload))
            except (TypeError, ValueError):
                continue
    return records


# ----- writing --------------------------------------------------------------------------------------------
def write_record(record: Record | dict[str, Any], run_dir: Path, store_dir: Path | None) -> list[Path]:
    """Write the record (or its JSON form; secrets redacted) into the run directory and, when given, the
    results store."""
    plain = record.to_dict() if isinstance(record, Record) else dict(record)
    payload = redact({**plain, "record_version": RECORD_VERSION})
    paths = [run_dir / RECORD_FILE]
    if store_dir is not None:
        paths.append(store_dir / f"{payload['run_id']}.json")
    for path in paths:
        atomic_write_json(path, payload)
    return paths
