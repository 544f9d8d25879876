"""Checkpoints: what a run writes every `checkpoint.every_n_steps` optimizer steps, and how.

- `ModelCheckpoint` every `checkpoint.every_n_steps` optimizer steps into `<run_dir>/checkpoints`, keeping
  the newest `checkpoint.keep` (`step=N.ckpt`) plus `last.ckpt`. A checkpoint is small: the module's
  `on_save_checkpoint` keeps the method's adapter (trainable tensors + extra state), never the frozen base,
  plus optimizer, scheduler and loop state, the run's loss/val history, tokens and seconds, the RNG states
  and the position in the training data (`TrainingState`; the data position is the sampler's,
  peftbench/tasks/sampler.py).
- Writes are atomic (`AtomicCheckpointIO`: temp file in the same directory, fsync, rename), and loading is
  `torch.load(weights_only=True)`: a Lightning checkpoint of peftbench holds only tensors, containers and
  primitives (its RNG states are stored as tensors and tuples), so no pickled objects need trusting.

Which checkpoint a run resumes from, and whether it may: peftbench/resume.py; signals:
peftbench/interrupts.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader

from peftbench.interrupts import StopOnInterrupt
from peftbench.tasks.sampler import loader_state, restore_loader_state

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LAST = "last.ckpt"
#: the key under which `TrainingState` keeps data position, RNG states, config fingerprint and run id
STATE_KEY = "peftbench_state"


# ----- which strategies ------------------------------------------------------------------------------------
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
            "data": loader_state(trainer),
            "rng": collect_rng(),
            "fingerprint": self.fingerprint,
            "run_id": self.run_id,
        }

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(STATE_KEY) or {}
        restore_loader_state(self.loader, state.get("data"))
        self._rng = state.get("rng")

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        # restored as late as possible: nothing between here and the next step draws random numbers
        if self._rng is not None:
            restore_rng(self._rng)
            self._rng = None


# ----- assembling -----------------------------------------------------------------------------------------
@dataclasses.dataclass
class Checkpointing:
    """What `train.py` hands to the Trainer: callbacks, plugins, `enable_checkpointing`, and where they go."""

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
    callbacks: list[Callback] = [
        TrainingState(train_loader, fingerprint, run_id),
        StopOnInterrupt(dirpath / LAST if dirpath else None),
    ]
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
