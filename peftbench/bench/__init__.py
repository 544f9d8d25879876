"""Speed and memory benchmark: peftbench's methods against HF PEFT's, on the same model, batch and precision.

    python -m peftbench.bench methods=[lora,lora_fa] model=tiny_llama bench.out=experiments/bench/x.json

For each method (`conf/method/<name>.yaml`, plus `method_overrides`) the run builds a fresh copy of one base
model for peftbench, then one for HF PEFT (`peft_side.py`), each measured alone in its memory window, and
trains both on the same seeded random batch (`bench.batch_size` x `bench.seq_len`, the last
`bench.label_fraction` of every row labelled, like an SFT response). It reports

- step time: forward, backward, optimizer step (plus the method's after-step hook), zero_grad; warm-up
  excluded, `bench.repeats` repeats of `bench.timed_steps` steps, the two sides' repeats interleaved so a
  change in the machine's load hits both, median and spread (`timing.py`);
- tokens/s: the batch's real (attended) tokens per second; with the default batch every position is real
  (padding fraction 0); `bench.min_seq_len` draws row lengths in [min_seq_len, seq_len] instead, a cycle of
  `bench.timed_steps` right-padded batches, batched at random or length-grouped (`bench.group_by_length`:
  the run's `task.group_by_length` sampler), and reports the padding fraction;
- memory: peak, split into weights / gradients / optimizer state / activations (`memory_split.py`);
- nominal model FLOPs per step and, on CUDA with known peak FLOPs, model FLOPs utilisation;
- the ratios peftbench / PEFT.

peftbench's loss is `peftbench.tasks.objectives.target_token_loss` (the output head on the labelled
positions only); PEFT's is `model(input_ids, attention_mask, labels=labels).loss` (full logits). The JSON
(`bench.json` in the Hydra output directory, optionally `bench.out`) states both, with the machine, the
versions, the git commit and the command. `bench.compile` compiles both sides' models in place as the
run's `trainer.compile` does (`peftbench.compiling`); `bench.gradient_checkpointing` is the run's
`model.gradient_checkpointing`, on both sides. `bench.sweep` repeats selected methods over sequence
lengths, ranks and model shapes and plots how the cost grows (`report.py`).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import math
import shlex
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from peftbench.bench.memory_split import (
    MemoryWindow,
    SavedTensorBytes,
    grad_bytes,
    optimizer_state_bytes,
    owned_storages,
    peak_source,
    release_cpu_memory,
    weight_bytes,
)
from peftbench.bench.peft_side import LOSS_PATH as PEFT_LOSS_PATH
from peftbench.bench.peft_side import (
    Batch,
    BuildContext,
    NoPeer,
    Trainee,
    build_peft,
    enable_checkpointing,
)
from peftbench.bench.timing import (
    ModelShape,
    StepTimes,
    matmul_trainable,
    model_flops,
    peak_flops,
    run_steps,
)
from peftbench.errors import ConfigError, bad_value

SCHEMA_VERSION = 1
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

PEFTBENCH_LOSS_PATH = (
    "peftbench.tasks.objectives.target_token_loss: decoder hidden states, output head on the labelled "
    "positions only, fp32 cross-entropy"
)

PRECISIONS = ("auto", "fp32", "bf16", "bf16-mixed")
DEVICES = ("auto", "cpu", "cuda")

#: the ratio fields: ours / theirs for each of these values of a row
RATIO_KEYS = (
    "step_s",
    "tokens_per_s",
    "peak_bytes",
    "weights_bytes",
    "grad_bytes",
    "optimizer_state_bytes",
    "activation_bytes",
)


# ----- settings -------------------------------------------------------------------------------------------
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


# ----- the batch ------------------------------------------------------------------------------------------
def make_batch(vocab_size: int, settings: Settings) -> Batch:
    """Seeded random tokens; the last `label_fraction` of each row is labelled, the rest -100."""
    generator = torch.Generator().manual_seed(settings.seed)
    shape = (settings.batch_size, settings.seq_len)
    input_ids = torch.randint(0, vocab_size, shape, generator=generator)
    labels = input_ids.clone()
    n_labels = max(1, round(settings.label_fraction * settings.seq_len))
    labels[:, : settings.seq_len - n_labels] = -100
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    return {k: v.to(settings.device) for k, v in batch.items()}


def make_batches(vocab_size: int, settings: Settings) -> list[Batch]:
    """The batches a side cycles through: `[make_batch(...)]` (every row `seq_len` long, no padding), or with
    `bench.min_seq_len` a cycle of `timed_steps` batches over `timed_steps * batch_size` seeded random rows of
    lengths uniform in `[min_seq_len, seq_len]`, ordered by the run's training sampler (shuffled, or
    length-grouped with `bench.group_by_length`) and right-padded by the run's collator; the last
    `label_fraction` of each row is labelled."""
    if settings.min_seq_len is None:
        return [make_batch(vocab_size, settings)]
    from peftbench.tasks.collate import CausalLMCollator, Encoded
    from peftbench.tasks.sampler import ResumableSampler

    generator = torch.Generator().manual_seed(settings.seed)
    pool = settings.batch_size * settings.timed_steps
    lengths = torch.randint(settings.min_seq_len, settings.seq_len + 1, (pool,), generator=generator)
    rows = []
    for length in lengths.tolist():
        ids = torch.randint(0, vocab_size, (length,), generator=generator).tolist()
        n_labels = max(1, round(settings.label_fraction * length))
        rows.append(Encoded(ids[: length - n_labels], ids[length - n_labels :], ""))
    sampler = ResumableSampler(pool, seed=settings.seed)
    if settings.group_by_length:
        sampler.group_by_length(lengths.tolist(), settings.batch_size)
    order = list(sampler)
    collate = CausalLMCollator(pad_id=0)
    batches = []
    for start in range(0, pool, settings.batch_size):
        batch = collate([rows[i] for i in order[start : start + settings.batch_size]])
        batches.append({k: batch[k].to(settings.device) for k in ("input_ids", "attention_mask", "labels")})
    return batches


def widest(batches: list[Batch]) -> Batch:
    """The batch with the most positions (the first of those): the measured step's, for the memory split."""
    return max(batches, key=lambda b: b["input_ids"].numel())


def batch_info(batches: Batch | list[Batch], settings: Settings | None = None) -> dict[str, Any]:
    """Shape of the widest batch, real tokens, labelled tokens and the padding fraction over the cycle."""
    batches = [batches] if isinstance(batches, dict) else batches
    mask = [b["attention_mask"] for b in batches]
    positions = sum(m.numel() for m in mask)
    tokens = sum(int(m.sum()) for m in mask)
    info: dict[str, Any] = {
        "shape": list(widest(batches)["labels"].shape),
        "batches": len(batches),
        "widths": [int(b["input_ids"].shape[1]) for b in batches],
        "tokens": tokens,
        "positions": positions,
        "labelled_tokens": sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches),
        "padding_fraction": 1 - tokens / positions,
        "source": "random token ids from torch.Generator().manual_seed(seed)",
    }
    if settings is not None and settings.min_seq_len is not None:
        info["lengths"] = f"uniform in [{settings.min_seq_len}, {settings.seq_len}]"
        info["group_by_length"] = settings.group_by_length
    return info


# ----- building the two sides -----------------------------------------------------------------------------
def build_ours(method_template: Any, base: nn.Module, settings: Settings) -> Trainee:
    """peftbench's `method` on a fresh copy of `base`, its own optimizer groups, `target_token_loss`."""
    from peftbench.methods import check_groups_cover
    from peftbench.tasks.objectives import target_token_loss

    method = copy.deepcopy(method_template)
    model = copy.deepcopy(base).to(device=settings.device, dtype=settings.dtype)
    if settings.gradient_checkpointing:
        enable_checkpointing(model)
    method.apply(model)
    model.train()
    groups = method.param_groups(model, lr=settings.lr, weight_decay=settings.weight_decay)
    check_groups_cover(groups, model)
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.999), eps=1e-8)
    method.plan_training(settings.total_steps)

    def loss(batch: Batch) -> torch.Tensor:
        return target_token_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])[0]

    def after_step(step: int) -> None:
        method.after_optimizer_step(model, step)

    notes = [f"{type(method).__name__} + torch AdamW over the method's param_groups"]
    return Trainee("peftbench", model, optimizer, loss, PEFTBENCH_LOSS_PATH, after_step, notes)


def build_context(settings: Settings, pretrained_dir: Callable[[], Path]) -> BuildContext:
    return BuildContext(
        device=settings.device,
        dtype=settings.dtype,
        lr=settings.lr,
        weight_decay=settings.weight_decay,
        betas=(0.9, 0.999),
        eps=1e-8,
        gradient_checkpointing=settings.gradient_checkpointing,
        pretrained_dir=pretrained_dir,
    )


class PretrainedDir:
    """A `save_pretrained` directory of the base model (for PEFT QLoRA's quantized load), made on demand:
    the embedded model's cache directory when the base is the embedded model, else a temporary copy."""

    def __init__(self, base: nn.Module, model_cfg: DictConfig) -> None:
        self.base = base
        self.model_cfg = model_cfg
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    def __call__(self) -> Path:
        from peftbench.models import ModelSpec, model_dir

        spec = ModelSpec.from_config(self.model_cfg)
        if spec.scheme == "embedded":
            return model_dir(spec.source)
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="peftbench-bench-")
            self.base.save_pretrained(self._tmp.name)
        return Path(self._tmp.name)

    def cleanup(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


# ----- measuring ------------------------------------------------------------------------------------------
def _one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())[:400]}"


class SideRun:
    """One implementation of one method, in the benchmark's phases.

    1. `prepare`: build a fresh copy in its own memory window, one eager step under the saved-tensor hooks
       (activations, gradients, optimizer state), the warm-up steps, then read the peak. The other side
       may already exist: it sits idle, below this side's baseline.
    2. `repeat`: one timed repeat; the two sides' repeats alternate.
    3. `result`: the row of the report (or the failure, as one line plus the traceback).

    The side cycles through `batches` (one batch unless `bench.min_seq_len`): the measured step takes the
    widest, the warm-up and every timed repeat start at the first, so each repeat sees the same batches.
    """

    def __init__(
        self,
        impl: str,
        build: Callable[[], Trainee],
        batches: Batch | list[Batch],
        settings: Settings,
        shape: ModelShape,
    ) -> None:
        self.impl, self.build, self.settings, self.shape = impl, build, settings, shape
        self.batches = [batches] if isinstance(batches, dict) else list(batches)
        self.cursor = 0  # the next batch of the cycle
        self.trainee: Trainee | None = None
        self.loss_fn: Callable[[Batch], torch.Tensor] | None = None
        self.steps = 0
        self.samples: list[float] = []
        self.info: dict[str, Any] = {}
        self.failure: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None and self.trainee is not None

    def fail(self, err: BaseException) -> None:
        """Record the exception being handled; the side takes no further part."""
        self.failure = {"impl": self.impl, "status": "failed", "error": _one_line(err)}
        self.failure["traceback"] = traceback.format_exc()
        self.close()

    def step(self) -> None:
        assert self.trainee is not None and self.loss_fn is not None
        batch = self.batches[self.cursor % len(self.batches)]
        self.cursor += 1
        with self.settings.autocast():
            loss = self.loss_fn(batch)
        loss.backward()
        self.trainee.optimizer.step()
        self.steps += 1
        self.trainee.after_step(self.steps)
        self.trainee.optimizer.zero_grad(set_to_none=True)

    def prepare(self) -> None:
        from peftbench.models import count_parameters

        settings = self.settings
        window = MemoryWindow(settings.device)
        window.start()
        torch.manual_seed(settings.seed)
        t0 = time.perf_counter()
        trainee = self.trainee = self.build()
        build_s = time.perf_counter() - t0
        window.built()
        weights = weight_bytes(trainee.model)

        saved = SavedTensorBytes(exclude=owned_storages(trainee.model))
        with saved.recording(), settings.autocast():
            loss = trainee.loss(widest(self.batches))
        loss.backward()
        grads = grad_bytes(trainee.trainable())
        trainee.optimizer.step()
        self.steps += 1
        trainee.after_step(self.steps)
        optim_bytes = optimizer_state_bytes(trainee.optimizer)
        trainee.optimizer.zero_grad(set_to_none=True)
        loss_first = float(loss.detach())
        del loss

        if settings.compile:  # what trainer.compile does in a run: the model's blocks, in place
            from peftbench.compiling import compile_in_place

            compile_in_place(trainee.model)
        self.loss_fn = trainee.loss
        self.cursor = 0
        warmup_s = run_steps(self.step, settings.device, settings.warmup_steps) * settings.warmup_steps
        memory: dict[str, Any] = window.peak()
        memory |= {
            "weights_bytes": weights,
            "grad_bytes": grads,
            "optimizer_state_bytes": optim_bytes,
            "activation_bytes": saved.total,
            "activation_tensors": len(saved.seen),
        }
        memory["split_sum_bytes"] = sum(
            memory[k] for k in ("weights_bytes", "grad_bytes", "optimizer_state_bytes", "activation_bytes")
        )
        self.info = {
            "memory": memory,
            "params": {
                "total": count_parameters(trainee.model),
                "trainable": count_parameters(trainee.model, trainable_only=True),
            },
            "loss_first": loss_first,
            "loss_path": trainee.loss_path,
            "model_flops_per_step": statistics.mean(
                model_flops(
                    self.shape,
                    b["input_ids"].numel(),
                    b["input_ids"].shape[1],
                    matmul_trainable(trainee.model),
                )
                for b in self.timed_batches()
            ),
            "build_s": build_s,
            "warmup_s": warmup_s,
            "notes": trainee.notes,
        }

    def timed_batches(self) -> list[Batch]:
        """The batches of one timed repeat, in order."""
        return [self.batches[i % len(self.batches)] for i in range(self.settings.timed_steps)]

    def repeat(self) -> None:
        self.cursor = 0
        self.samples.append(run_steps(self.step, self.settings.device, self.settings.timed_steps))

    def result(self) -> dict[str, Any]:
        if self.failure is not None:
            return self.failure
        settings = self.settings
        times = StepTimes(
            tuple(self.samples), settings.timed_steps, settings.warmup_steps, self.info["warmup_s"]
        )
        tokens = statistics.mean(int(b["attention_mask"].sum()) for b in self.timed_batches())
        peak = peak_flops(settings.device, settings.autocast_dtype)
        info = {k: v for k, v in self.info.items() if k != "warmup_s"}
        return {
            "impl": self.impl,
            "status": "ok",
            "step_s": times.to_dict(),
            "tokens_per_s": tokens / times.median,
            "tokens_per_step": tokens,
            **info,
            "mfu": info["model_flops_per_step"] / times.median / peak if peak else None,
        }

    def close(self) -> None:
        self.trainee = None
        self.loss_fn = None


def summary_values(row: dict[str, Any] | None) -> dict[str, float] | None:
    """The values the ratios compare, flat (None unless the row is ok)."""
    if not row or row.get("status") != "ok":
        return None
    memory = row["memory"]
    return {
        "step_s": row["step_s"]["median"],
        "tokens_per_s": row["tokens_per_s"],
        **{k: memory[k] for k in RATIO_KEYS if k in memory},
    }


def ratios(ours: dict[str, Any] | None, theirs: dict[str, Any] | None) -> dict[str, float | None] | None:
    """peftbench / PEFT for every `RATIO_KEYS` value (None where PEFT's is 0); None without both rows ok.

    Also `step_s_paired`: the median over repeats of the ratio of the two sides' interleaved repeats (the
    most robust to a machine whose load changes), and `loss_first_rel_diff`: how far apart the two sides'
    first losses are (same weights and batch: near 0 when they compute the same thing)."""
    a, b = summary_values(ours), summary_values(theirs)
    if a is None or b is None or ours is None or theirs is None:
        return None
    out: dict[str, float | None] = {k: (a[k] / b[k] if b[k] else None) for k in RATIO_KEYS}
    pairs = zip(ours["step_s"]["samples"], theirs["step_s"]["samples"], strict=False)
    paired = [x / y for x, y in pairs if y > 0]
    out["step_s_paired"] = statistics.median(paired) if paired else None
    la, lb = ours["loss_first"], theirs["loss_first"]
    out["loss_first_rel_diff"] = abs(la - lb) / max(abs(lb), 1e-12)
    return out


def bench_method(
    method: Any,
    base: nn.Module,
    batch: Batch | list[Batch],
    settings: Settings,
    shape: ModelShape,
    pretrained: Callable[[], Path],
) -> dict[str, Any]:
    """Both implementations of one method on `batch` (or a cycle of batches: `make_batches`); the entry of
    `results` in the JSON."""
    entry: dict[str, Any] = {"method": method.name, "hyperparameters": method.hyperparameters()}
    ours = SideRun("peftbench", lambda: build_ours(method, base, settings), batch, settings, shape)
    theirs: SideRun | None = None
    entry["peft_missing"] = None
    try:
        ours.prepare()
    except Exception as err:
        ours.fail(err)
    if not settings.peft:
        entry["peft_missing"] = "bench.peft=false"
    else:
        ctx = build_context(settings, pretrained)
        theirs = SideRun("peft", lambda: build_peft(method, base, ctx), batch, settings, shape)
        try:
            theirs.prepare()
        except NoPeer as err:
            entry["peft_missing"] = str(err)
            theirs.close()
            theirs = None
        except Exception as err:
            theirs.fail(err)
    sides = [s for s in (ours, theirs) if s is not None]
    for i in range(settings.repeats):
        for side in sides if i % 2 == 0 else sides[::-1]:  # alternate who goes first
            if side.ok:
                try:
                    side.repeat()
                except Exception as err:
                    side.fail(err)
    entry["peftbench"] = ours.result()
    entry["peft"] = theirs.result() if theirs is not None else None
    for side in sides:
        side.close()
    entry["ratios"] = ratios(entry["peftbench"], entry["peft"])
    gc.collect()
    return entry


def prime(
    method: Any,
    base: nn.Module,
    batch: Batch | list[Batch],
    settings: Settings,
    shape: ModelShape,
    pretrained: Any,
) -> None:
    """One discarded build and step of both sides, so that lazy imports, library initialisation and kernel
    caches fall outside the first measured row (its memory baseline and its timings)."""
    import importlib

    for module in ("peft", "peft.optimizers", "bitsandbytes"):
        with contextlib.suppress(Exception):
            importlib.import_module(module)
    bench_method(
        method, base, batch, replace(settings, warmup_steps=0, timed_steps=1, repeats=1), shape, pretrained
    )


# ----- sweeps ---------------------------------------------------------------------------------------------
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


# ----- the run --------------------------------------------------------------------------------------------
@dataclass
class BenchRun:
    """Everything one `run_bench` produced: the JSON payload and where it was written."""

    payload: dict[str, Any]
    paths: list[Path] = field(default_factory=list)


def _settings_dict(settings: Settings) -> dict[str, Any]:
    import dataclasses

    data = dataclasses.asdict(settings)
    data["device"] = str(settings.device)
    data["dtype"] = str(settings.dtype).removeprefix("torch.")
    data["autocast"] = (
        str(settings.autocast_dtype).removeprefix("torch.") if settings.autocast_dtype else None
    )
    return data


def run_bench(
    cfg: DictConfig, out_dir: Path, log: Callable[[str], None] | None = None, console: Any = None
) -> BenchRun:
    """Validate, run every method on both sides, write `bench.json` (+ plots) and print the tables."""
    from peftbench.bench import report
    from peftbench.models import load_model

    log = log or _progress
    settings = parse_settings(cfg)
    methods = resolve_methods(cfg, r=settings.r)
    sweep = check_sweep(cfg)
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    started = time.perf_counter()
    machine = report.machine_info(settings.device)
    with _quiet_transformers():
        base, _tokenizer = load_model(cfg.model)
        base.requires_grad_(False)
        shape = ModelShape.of(base)
        batch = make_batches(base.config.vocab_size, settings)
        pretrained = PretrainedDir(base, cfg.model)
        results = []
        try:
            log(f"priming: one discarded step of {methods[0].name} on both sides")
            prime(methods[0], base, batch, settings, shape, pretrained)
            for method in methods:
                log(f"bench {method.name}: peftbench and HF PEFT, timed repeats interleaved")
                results.append(bench_method(method, base, batch, settings, shape, pretrained))
        finally:
            pretrained.cleanup()
        sweeps = run_sweeps(cfg, sweep, base, settings, log) if sweep["enabled"] else {}
    machine["load_average_end"] = report.load_average()
    payload = {
        "schema_version": SCHEMA_VERSION,
        "command": shlex.join(["python", "-m", "peftbench.bench", *sys.argv[1:]]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine,
        "model": {
            "name": str(cfg.model.name),
            "name_or_path": str(cfg.model.name_or_path),
            "params": shape.total_params,
            "linear_params": shape.linear_params,
            "layers": shape.layers,
            "vocab_size": shape.vocab_size,
        },
        "settings": _settings_dict(settings),
        "batch": batch_info(batch, settings),
        "loss_path": {"peftbench": PEFTBENCH_LOSS_PATH, "peft": PEFT_LOSS_PATH},
        "memory_method": {
            "peak": peak_source(settings.device),
            "peak_bytes": "peak over the measured step and the warm-up steps minus the memory held before "
            "the model copy was built (the other side's model, idle, is below that baseline)",
            "activation_bytes": "autograd saved tensors of one forward (saved_tensors_hooks), each storage "
            "once, the model's own weights excluded (under gradient checkpointing, what checkpointed layers "
            "recompute is not saved and not counted)",
            "weights_bytes": "peftbench.models.parameter_bytes (parameters, buffers, quantization stats)",
            "grad_bytes": ".grad of every parameter after backward",
            "optimizer_state_bytes": "tensors in optimizer.state after a step",
            "priming": "before the first row, one discarded build and step of the first method on both sides",
        },
        "flops_method": model_flops.__doc__ and " ".join(model_flops.__doc__.split()),
        "results": results,
        "sweeps": sweeps,
        "wall_s": time.perf_counter() - started,
    }
    paths = report.write_outputs(payload, out_dir, settings.out, plot=settings.plot)
    report.print_report(payload, console=console)
    return BenchRun(payload, paths)


def _progress(message: str) -> None:
    """A progress line on stderr (a full CPU benchmark takes tens of minutes) and in the run's log file."""
    logging.getLogger("peftbench.bench").info(message)
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No weight-loading progress bars in the benchmark's output."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        yield
        return
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


__all__ = ["BenchRun", "Settings", "parse_settings", "ratios", "resolve_methods", "run_bench"]
