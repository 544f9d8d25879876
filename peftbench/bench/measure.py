"""Measuring one method: `SideRun` takes one implementation through its phases (build and one measured
step in its own memory window, warm-up, timed repeats, the report row), `bench_method` runs both sides
with their timed repeats interleaved, `summary_values` and `ratios` compare the two rows (peftbench /
PEFT), and `prime` makes one discarded build and step so that one-off start-up costs fall outside the first
measured row."""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftbench.bench.batches import widest
from peftbench.bench.memory_split import (
    MemoryWindow,
    SavedTensorBytes,
    grad_bytes,
    optimizer_state_bytes,
    owned_storages,
    weight_bytes,
)
from peftbench.bench.peft_side import Batch, NoPeer, Trainee, build_peft
from peftbench.bench.settings import Settings
from peftbench.bench.sides import build_context, build_ours
from peftbench.bench.timing import ModelShape, StepTimes, matmul_trainable, model_flops, peak_flops, run_steps

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
