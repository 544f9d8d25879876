"""Checkpoints, exact resume and interrupts: a run killed at any point loses at most the steps since its
last checkpoint, and a resumed run ends exactly where an uninterrupted one would (CPU, same seed).

- `ModelCheckpoint` every `checkpoint.every_n_steps` optimizer steps into `<run_dir>/checkpoints`, keeping
  the newest `checkpoint.keep` (`step=N.ckpt`) plus `last.ckpt`. A checkpoint is small: the module's
  `on_save_checkpoint` keeps the method's adapter (trainable tensors + extra state), never the frozen base,
  plus optimizer, scheduler and loop state, the run's loss/val history, tokens and seconds, the RNG states
  and the position in the training data (`TrainingState`).
- Writes are atomic (`AtomicCheckpointIO`: temp file in the same directory, fsync, rename), and loading is
  `torch.load(weights_only=True)`: a Lightning checkpoint of peftbench holds only tensors, containers and
  primitives (its RNG states are stored as tensors and tuples), so no pickled objects need trusting.
- `resume: auto` resumes from `<run_dir>/checkpoints` when it holds a checkpoint (Hydra makes a new run dir
  per launch: pass `hydra.run.dir=<the old run dir>`), `resume: <file.ckpt | run dir | checkpoints dir>`
  from there, `resume: null` starts afresh. A truncated or corrupt checkpoint is reported and skipped for
  the previous one.
- SIGINT / SIGTERM during training stop at the end of the current optimizer step, write `last.ckpt` and
  raise `RunInterrupted` (recorded as `status: interrupted`); outside training they stop at once. A second
  signal stops at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
import re
import signal
import tempfile
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, RandomSampler, SequentialSampler

from peftbench.errors import ConfigError, bad_value
from peftbench.tasks.sampler import ResumableSampler

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LAST = "last.ckpt"
#: the key under which `TrainingState` keeps data position, RNG states, config fingerprint and run id
STATE_KEY = "peftbench_state"
_STEP = re.compile(r"step=(\d+)")


# ----- configuration ------------------------------------------------------------------------------------
def check_checkpoint_config(cfg: Any) -> None:
    """`checkpoint.*` and `resume`: one-line ConfigError naming the bad key."""
    ckpt = cfg.get("checkpoint") or {}
    every = ckpt.get("every_n_steps")
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise bad_value(
            "checkpoint.every_n_steps", every, "an integer >= 1 (optimizer steps), or null (none)"
        )
    keep = ckpt.get("keep", 2)
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise bad_value("checkpoint.keep", keep, "an integer >= 1")
    keep_on_success = ckpt.get("keep_on_success", True)
    if not isinstance(keep_on_success, bool):
        raise bad_value("checkpoint.keep_on_success", keep_on_success, "true, false")
    resume = cfg.get("resume", "auto")
    if resume is not None and (not isinstance(resume, str) or not resume.strip()):
        raise bad_value("resume", resume, "auto, null, or the path of a .ckpt file or a run directory")
    keyword = isinstance(resume, str) and resume.strip().lower() in ("auto", "null", "none")
    if isinstance(resume, str) and not keyword and not _absolute(resume).exists():
        raise ConfigError(
            f"resume={resume!r} does not exist; accepted: auto, null, a .ckpt file or a run directory"
        )


def _absolute(path: str) -> Path:
    """A user path, relative ones against the launch directory (Hydra may have changed the cwd)."""
    resolved = Path(path).expanduser()
    if resolved.is_absolute():
        return resolved
    try:
        from hydra.utils import to_absolute_path

        return Path(to_absolute_path(str(resolved)))
    except ValueError:  # hydra not initialised
        return resolved.resolve()


def strategy_name(strategy: Any) -> str:
    """`trainer.strategy` as a lower-case name: the string itself, or the class of a `_target_` mapping
    (`lightning.pytorch.strategies.FSDPStrategy` -> `fsdpstrategy`)."""
    if isinstance(strategy, str):
        return strategy.lower()
    if hasattr(strategy, "get") and isinstance(strategy.get("_target_"), str):
        return strategy.get("_target_").rsplit(".", 1)[-1].lower()
    return type(strategy).__name__.lower()


def checkpointing_supported(strategy: Any) -> bool:
    """peftbench checkpoints (adapter-only, atomic, resumable) work on one device and under DDP."""
    name = strategy_name(strategy)
    return name in ("auto", "single_device", "singledevicestrategy") or name.startswith("ddp")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ----- writing and reading -------------------------------------------------------------------------------
class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temp file in the same directory, fsync, rename over the target; load `weights_only`."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a checkpoint is as shareable as its dir
            os.replace(tmp, path)
            with contextlib.suppress(OSError):  # make the rename itself durable
                dir_fd = os.open(path.parent, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = True) -> Any:
        return load_checkpoint_file(path)


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """`torch.load(weights_only=True)` on CPU: tensors, containers and primitives only, nothing executed."""
    checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError("not a Lightning checkpoint (no state_dict)")
    return checkpoint


def _step_of(path: Path) -> int:
    match = _STEP.search(path.name)
    return int(match.group(1)) if match else -1


def candidates(directory: Path) -> list[Path]:
    """`last.ckpt` first, then the step checkpoints, newest first (temp files of killed writes skipped)."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.glob("*.ckpt") if not p.name.startswith(".")]
    last = [p for p in found if p.name == LAST]
    rest = sorted((p for p in found if p.name != LAST), key=lambda p: (_step_of(p), p.stat().st_mtime))
    return last + rest[::-1]


@dataclasses.dataclass
class Resume:
    """A checkpoint to resume from: its path, its loaded content, and the damaged ones skipped on the way."""

    path: Path
    checkpoint: dict[str, Any]
    skipped: list[str]

    @property
    def step(self) -> int:
        return int(self.checkpoint.get("global_step", 0))


def find_checkpoint(directory: Path) -> tuple[Resume | None, list[str]]:
    """The newest loadable checkpoint in `directory`, and a note for every damaged one skipped."""
    skipped: list[str] = []
    for path in candidates(directory):
        try:
            checkpoint = load_checkpoint_file(path)
        except Exception as err:  # truncated zip, unpickling refused, not a checkpoint, unreadable
            first = (str(err).strip().splitlines() or [""])[0][:200]
            skipped.append(f"{path.name}: {type(err).__name__}: {first}")
            continue
        return Resume(path, checkpoint, skipped), skipped
    return None, skipped


def resolve_resume(resume: Any, run_dir: Path) -> Resume | None:
    """What `resume` points at: None (start afresh) or a verified checkpoint. ConfigError for a bad path."""
    if resume is None or (isinstance(resume, str) and resume.strip().lower() in ("null", "none", "")):
        return None
    if resume == "auto":
        found, skipped = find_checkpoint(run_dir / CHECKPOINT_DIR)
        for note in skipped:
            log.warning("checkpoint skipped (damaged): %s", note)
        if found is None and skipped:
            log.warning("no loadable checkpoint in %s: starting afresh", run_dir / CHECKPOINT_DIR)
        return found
    path = _absolute(resume)
    if path.is_file():
        try:
            return Resume(path, load_checkpoint_file(path), [])
        except Exception as err:
            first = (str(err).strip().splitlines() or [""])[0][:200]
            raise ConfigError(
                f"resume={str(path)!r} is not a readable checkpoint ({type(err).__name__}: {first}); "
                "accepted: a .ckpt written by peftbench, or its run directory (the newest good one is used)"
            ) from None
    if path.is_dir():
        directory = path / CHECKPOINT_DIR if (path / CHECKPOINT_DIR).is_dir() else path
        found, skipped = find_checkpoint(directory)
        for note in skipped:
            log.warning("checkpoint skipped (damaged): %s", note)
        if found is None:
            why = f" ({len(skipped)} damaged)" if skipped else ""
            raise ConfigError(
                f"resume={str(path)!r} holds no loadable checkpoint{why}; accepted: auto, null, a .ckpt "
                "file, a run directory or its checkpoints directory"
            )
        return found
    raise ConfigError(
        f"resume={str(path)!r} does not exist; accepted: auto, null, a .ckpt file or a run directory"
    )


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out |= _flat(sub, f"{prefix}{key}.")
        return out
    return {prefix.rstrip("."): value}


def check_compatible(resume: Resume, fingerprint: dict[str, Any]) -> None:
    """A checkpoint resumes only the run that wrote it: same method, model, task, data, seed and optimizer."""
    saved = resume.checkpoint.get(STATE_KEY, {}).get("fingerprint")
    if saved is None:
        return
    old, new = _flat(saved), _flat(fingerprint)
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            raise ConfigError(
                f"resume={str(resume.path)!r} was written by a run with {key}={old.get(key)!r}, this run has "
                f"{key}={new.get(key)!r}; accepted: the same config (or resume=null to start afresh)"
            )


# ----- RNG and data position -----------------------------------------------------------------------------
def collect_rng() -> dict[str, Any]:
    """Every RNG a training step may draw from, as tensors / tuples (loadable with weights_only)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [
            str(name),
            torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            int(pos),
            int(has_gauss),
            float(cached),
        ],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resumable_train_loader(loader: DataLoader, seed: int) -> DataLoader:
    """The training loader with a `ResumableSampler` (exact mid-epoch resume, DDP sharding).

    A plain shuffled or sequential loader is rebuilt around the sampler (as Lightning rebuilds loaders for
    its distributed sampler); a loader that already has one is kept; anything else (a custom batch sampler,
    an iterable dataset) is kept as it is, and resumes at the start of its epoch (Lightning warns).
    """
    if isinstance(loader.sampler, ResumableSampler):
        if loader.generator is None:
            loader.generator = torch.Generator().manual_seed(seed)
        return loader
    sampler = loader.sampler
    plain = (
        type(loader) is DataLoader
        and type(loader.batch_sampler) is BatchSampler
        and not isinstance(loader.dataset, IterableDataset)
        and (
            type(sampler) is SequentialSampler
            or (type(sampler) is RandomSampler and not sampler.replacement and sampler._num_samples is None)
        )
    )
    if not plain:
        log.warning("the training loader (%s) cannot resume mid-epoch exactly", type(loader.sampler).__name__)
        return loader
    kwargs: dict[str, Any] = {
        "batch_size": loader.batch_size,
        "drop_last": loader.drop_last,
        "collate_fn": loader.collate_fn,
        "num_workers": loader.num_workers,
        "pin_memory": loader.pin_memory,
        "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn,
        "persistent_workers": loader.persistent_workers,
    }
    if loader.num_workers > 0:
        kwargs["prefetch_factor"] = loader.prefetch_factor
        kwargs["multiprocessing_context"] = loader.multiprocessing_context
    shuffle = isinstance(sampler, RandomSampler)
    return DataLoader(
        loader.dataset,
        sampler=ResumableSampler(len(loader.dataset), seed=seed, shuffle=shuffle),  # type: ignore[arg-type]
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    )


def own_generator(loader: DataLoader, seed: int = 0) -> DataLoader:
    """Give an evaluation loader its own generator: making its iterator then leaves the global RNG alone
    (otherwise a validation pass would shift the dropout masks of the steps after it)."""
    if loader.generator is None:
        loader.generator = torch.Generator().manual_seed(seed)
    return loader


class TrainingState(Callback):
    """Saves and restores what Lightning does not: RNG states, the position in the training data (for the
    `ResumableSampler`), the config fingerprint (a checkpoint resumes only its own run) and the run id."""

    def __init__(self, train_loader: DataLoader, fingerprint: dict[str, Any], run_id: str) -> None:
        self.loader = train_loader
        self.fingerprint = fingerprint
        self.run_id = run_id
        self._rng: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        checkpoint[STATE_KEY] = {
            "data": {
                "epoch": int(trainer.current_epoch),
                "batches": int(trainer.fit_loop.epoch_loop.batch_progress.current.ready),
            },
            "rng": collect_rng(),
            "fingerprint": self.fingerprint,
            "run_id": self.run_id,
        }

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(STATE_KEY) or {}
        data = state.get("data")
        sampler = getattr(self.loader, "sampler", None)
        if data and isinstance(sampler, ResumableSampler):
            sampler.resume_at(data["epoch"], data["batches"] * int(self.loader.batch_size or 1))
        self._rng = state.get("rng")

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        # restored as late as possible: nothing between here and the next step draws random numbers
        if self._rng is not None:
            restore_rng(self._rng)
            self._rng = None


# ----- interrupts ----------------------------------------------------------------------------------------
class RunInterrupted(BaseException):
    """SIGINT / SIGTERM: the run stopped; `checkpoint` is where it can resume from (None: none written).

    A BaseException so no `except Exception` on the way swallows it."""

    def __init__(self, signum: int, step: int | None = None, checkpoint: Path | None = None) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        where = f" at step {step}" if step is not None else ""
        saved = f"; checkpoint {checkpoint}" if checkpoint else ""
        super().__init__(f"interrupted by {signal.Signals(signum).name}{where}{saved}")

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


class Interrupts:
    """SIGINT/SIGTERM handlers: during training (`deferred`) a signal only asks the run to stop after the
    current optimizer step; otherwise, or on a second signal, `RunInterrupted` is raised at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.deferred = False
        self.trainer: L.Trainer | None = None  # the training run to stop (set while it trains)
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        self.signum, self.deferred = None, False
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}
        self.deferred, self.trainer = False, None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first = self.signum is None
        self.signum = signum
        if self.deferred and first:
            # Lightning's own SIGTERM handler (it runs first) would stop the loop with a SystemExit after
            # the current batch, before a checkpoint: StopOnInterrupt stops it, with one, instead
            connector = getattr(self.trainer, "_signal_connector", None)
            if connector is not None and hasattr(connector, "received_sigterm"):
                connector.received_sigterm = False
            log.warning(
                "received %s: stopping after this training step and writing a checkpoint (send it again to "
                "stop at once)",
                signal.Signals(signum).name,
            )
            return
        raise RunInterrupted(signum)


INTERRUPTS = Interrupts()


class StopOnInterrupt(Callback):
    """After the optimizer step during which a signal arrived: write `last.ckpt`, raise RunInterrupted."""

    def __init__(self, dirpath: Path | None) -> None:
        self.dirpath = dirpath

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        INTERRUPTS.deferred, INTERRUPTS.trainer = True, trainer

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        INTERRUPTS.deferred, INTERRUPTS.trainer = False, None

    def on_exception(self, trainer: L.Trainer, pl_module: Any, exception: BaseException) -> None:
        INTERRUPTS.deferred, INTERRUPTS.trainer = False, None

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, i: int) -> None:
        if trainer.fit_loop.epoch_loop._should_accumulate():
            return  # mid-accumulation: stop only where an optimizer step has just completed
        stop = INTERRUPTS.signum is not None
        if trainer.world_size > 1:  # every rank stops after the same step (and joins the same save)
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        path = None
        if self.dirpath is not None:
            path = self.dirpath / LAST
            trainer.save_checkpoint(path)
        raise RunInterrupted(INTERRUPTS.signum or signal.SIGTERM, trainer.global_step, path)

    def on_validation_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        # a validation pass can take minutes: stop now; the run resumes from its last checkpoint
        if INTERRUPTS.signum is not None and trainer.world_size == 1:
            raise RunInterrupted(INTERRUPTS.signum, trainer.global_step, None)


# ----- assembling -----------------------------------------------------------------------------------------
@dataclasses.dataclass
class Checkpointing:
    """What `run.py` hands to the Trainer: callbacks, plugins, `enable_checkpointing`, and where they go."""

    callbacks: list[Callback]
    plugins: list[Any]
    enabled: bool
    dirpath: Path | None


def build_checkpointing(
    cfg: Any, run_dir: Path, train_loader: DataLoader, fingerprint: dict[str, Any], run_id: str
) -> Checkpointing:
    """`ModelCheckpoint` every `checkpoint.every_n_steps` optimizer steps (the newest `checkpoint.keep` plus
    `last.ckpt`), the training-state and interrupt callbacks, and the atomic checkpoint writer."""
    every = cfg.checkpoint.get("every_n_steps")
    strategy = cfg.trainer.get("strategy", "auto")
    enabled = every is not None and bool(cfg.trainer.get("enable_checkpointing", True))
    if enabled and not checkpointing_supported(strategy):
        log.warning("checkpoints are not supported with trainer.strategy=%s: none are written", strategy)
        enabled = False
    dirpath = run_dir / CHECKPOINT_DIR if enabled else None
    callbacks: list[Callback] = [TrainingState(train_loader, fingerprint, run_id), StopOnInterrupt(dirpath)]
    if enabled:
        callbacks.append(
            ModelCheckpoint(
                dirpath=dirpath,
                filename="{step}",
                monitor="step",  # "the newest k": Lightning's own `step` candidate, highest kept
                mode="max",
                save_top_k=int(cfg.checkpoint.get("keep", 2)),
                save_last=True,
                every_n_train_steps=int(every),
                save_on_train_epoch_end=False,
            )
        )
    plugins = [AtomicCheckpointIO()] if checkpointing_supported(strategy) else []
    return Checkpointing(callbacks, plugins, enabled, dirpath)


def expected_final_validation(cfg: Any, step: int) -> bool:
    """Whether an uninterrupted run validates right after optimizer step `step` (default: at the end)."""
    trainer = cfg.trainer
    interval = trainer.get("val_check_interval")
    if trainer.get("limit_val_batches", 1.0) == 0 or trainer.get("check_val_every_n_epoch") is not None:
        return False
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        return False
    batches = step * int(trainer.get("accumulate_grad_batches", 1) or 1)
    return batches % interval == 0 and math.isfinite(batches)
