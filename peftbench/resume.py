"""Resume, in one place: which checkpoint a run continues from, whether it may, and what it owes the run.

- `resume: auto` resumes from `<run_dir>/checkpoints` when it holds a checkpoint (Hydra makes a new run dir
  per launch: pass `hydra.run.dir=<the old run dir>`), `resume: <file.ckpt | run dir | checkpoints dir>`
  from there, `resume: null` starts afresh. A truncated or corrupt checkpoint is reported and skipped for
  the previous one.
- A checkpoint resumes only the run that wrote it (`config_fingerprint`: method, model, task, optimizer,
  seed, batch), with the same adapter tensors; the resumed run keeps the run id of the one it continues.
- A run killed after its final checkpoint but before that step's validation validates once more
  (`validate_if_missed`), so a resumed run ends exactly where an uninterrupted one would (CPU, same seed).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from peftbench.checkpointing import (
    CHECKPOINT_DIR,
    LAST,
    STATE_KEY,
    checkpointing_supported,
    load_checkpoint_file,
)
from peftbench.errors import ConfigError, bad_value, check_int, is_int

log = logging.getLogger(__name__)

_STEP = re.compile(r"step=(\d+)")


# ----- configuration ------------------------------------------------------------------------------------
def check_checkpoint_config(cfg: Any) -> None:
    """`checkpoint.*` and `resume`: one-line ConfigError naming the bad key."""
    ckpt = cfg.get("checkpoint") or {}
    every = ckpt.get("every_n_steps")
    if every is not None:
        check_int(
            "checkpoint.every_n_steps", every, accepted="an integer >= 1 (optimizer steps), or null (none)"
        )
    keep = ckpt.get("keep", 2)
    check_int("checkpoint.keep", keep)
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


# ----- finding a checkpoint ------------------------------------------------------------------------------
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
        return int(self.checkpoint.get("global_step", self._step))

    @property
    def run_id(self) -> str | None:
        """The run id of the run that wrote the checkpoint (a resumed run keeps it)."""
        return self.checkpoint.get(STATE_KEY, {}).get("run_id")

    _step: int = 0

    def summary(self) -> dict[str, Any]:
        """The record's `resumed_from`."""
        return {"checkpoint": str(self.path), "step": self.step, "skipped": self.skipped}

    def release(self) -> None:
        """Free the loaded tensors (Lightning loads the file again); the step and path stay known."""
        self._step = self.step
        self.checkpoint = {}


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


def expected_final_validation(cfg: Any, step: int) -> bool:
    """Whether an uninterrupted run validates right after optimizer step `step` (default: at the end)."""
    trainer = cfg.trainer
    interval = trainer.get("val_check_interval")
    if trainer.get("limit_val_batches", 1.0) == 0 or trainer.get("check_val_every_n_epoch") is not None:
        return False
    if not is_int(interval) or interval < 1:
        return False
    batches = step * int(trainer.get("accumulate_grad_batches", 1) or 1)
    return batches % interval == 0 and math.isfinite(batches)


def newest_checkpoint(run_dir: Path) -> str | None:
    """The checkpoint a failed or interrupted run can resume from (None: none written)."""
    found = candidates(run_dir / CHECKPOINT_DIR)
    return str(found[0]) if found else None


# ----- a run's resume ------------------------------------------------------------------------------------
def config_fingerprint(cfg: DictConfig, method: Any) -> dict[str, Any]:
    """What must not change between a run and its resumption (a checkpoint resumes only its own run)."""
    return {
        "method": method.hyperparameters(),
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "task": OmegaConf.to_container(cfg.task, resolve=True),
        "optim": OmegaConf.to_container(cfg.optim, resolve=True),
        "seed": cfg.seed,
        "batch_size": cfg.batch_size,
        "accumulate_grad_batches": cfg.trainer.get("accumulate_grad_batches", 1),
    }


def resume_for(cfg: DictConfig, run_dir: Path, fingerprint: dict[str, Any]) -> Resume | None:
    """The checkpoint this run continues from (None: it starts afresh), checked against the run's config
    before anything is loaded. ConfigError for a bad `resume`, an unsupported strategy or another run's
    checkpoint."""
    resume = resolve_resume(cfg.get("resume", "auto"), run_dir)
    if resume is not None and not checkpointing_supported(cfg.trainer.get("strategy", "auto")):
        if cfg.get("resume") != "auto":
            raise ConfigError(
                f"resume={cfg.resume!r} is not supported with trainer.strategy="
                f"{cfg.trainer.get('strategy')!r}; accepted: resume=null, or trainer=default / trainer=ddp"
            )
        log.warning("not resuming from %s: trainer.strategy does not support it", resume.path)
        resume = None
    if resume is not None:
        check_compatible(resume, fingerprint)
    return resume


def check_adapter(resume: Resume, method: Any, model: Any) -> None:
    """The checkpoint holds exactly the adapter tensors this method builds on this model."""
    expected = {f"model.{k}" for k in method.adapter_state_dict(model)}
    if set(resume.checkpoint["state_dict"]) != expected:
        raise ConfigError(
            f"resume={str(resume.path)!r} holds other adapter tensors than this method builds "
            f"({len(resume.checkpoint['state_dict'])} vs {len(expected)}); accepted: a checkpoint of the "
            "same method and model (or resume=null)"
        )


def validate_if_missed(
    cfg: DictConfig, resumed_from: Resume | None, trainer: Any, module: Any, loader: Any
) -> None:
    """A run killed after its final checkpoint, before that step's validation: Lightning resumes past it,
    so validate here, as the uninterrupted run did."""
    if (
        resumed_from is not None
        and resumed_from.step == trainer.global_step
        and expected_final_validation(cfg, trainer.global_step)
        and not any(h.get("step") == trainer.global_step for h in module.val_history)
    ):
        trainer.validate(module, dataloaders=loader, verbose=False)
