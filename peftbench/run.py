"""The entry point: command-line checks, the Hydra main, and the record of every run, failed or not.

One run is `prepare(cfg)` (the config rewritten once: tuned values, budget; then checked), `build(cfg, ...)`
(peftbench/build.py) and `train(cfg, built, run_dir)` (peftbench/train.py); a run with `stages:` is
peftbench/stages.py. Resume: peftbench/resume.py; signals: peftbench/interrupts.py.

python -m peftbench.run method=vera task=summarization
python -m peftbench.run -m method=lora,lora_fa,vera seed=0,1,2

A run checkpoints every `checkpoint.every_n_steps` optimizer steps into `<run dir>/checkpoints` and resumes
from there (`resume=auto`, the default) when launched again in the same directory:
python -m peftbench.run method=vera hydra.run.dir=outputs/default/vera/seed0-20250101-120000
python -m peftbench.run method=vera resume=outputs/default/vera/seed0-20250101-120000   # or a .ckpt file
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from peftbench.build import build, new_run_id, output_dir, prepare
from peftbench.cli_checks import CONF_DIR
from peftbench.errors import ConfigError
from peftbench.lr_search import objective, register_resolvers
from peftbench.record import RECORD_FILE, Record, read_record, write_record
from peftbench.validation import composition_error, load_config

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
register_resolvers()  # ${peftbench.scale:...}, ${peftbench.sqlite:...} in conf/sweep/
log = logging.getLogger(__name__)


def _is_multirun() -> bool:
    try:
        return HydraConfig.get().mode.name == "MULTIRUN"
    except ValueError:
        return False


def _rank_zero() -> bool:
    """True in the process that writes records and adapters (the only one outside distributed runs)."""
    from lightning.pytorch.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


# ----- one run --------------------------------------------------------------------------------------------
def run_single(cfg: DictConfig, run_id: str | None = None) -> tuple[Record, dict[str, Any]]:
    """One run (no stages): `(record, objects)`; ConfigError on bad input before training."""
    from peftbench.resume import config_fingerprint, resume_for
    from peftbench.train import train

    started = time.perf_counter()
    run_dir = output_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    method, task = prepare(cfg)  # everything that can be wrong with the input is checked here
    fingerprint = config_fingerprint(cfg, method)
    resume = resume_for(cfg, run_dir, fingerprint)
    run_id = (resume.run_id if resume else None) or run_id or new_run_id(cfg)
    built = build(cfg, method, task)
    trained = train(
        cfg, built, run_dir, run_id=run_id, fingerprint=fingerprint, resume=resume, started=started
    )
    objects = {"model": built.model, "method": method, "task": task, "trainer": trained.trainer}
    return trained.record, {**objects, "module": trained.module}


def failure_kind(err: BaseException) -> str:
    """A short machine-readable failure class for the results record."""
    from peftbench.module import NonFiniteLossError

    if isinstance(err, ConfigError):
        return "config"
    if isinstance(err, NonFiniteLossError):
        return "nan"
    if "out of memory" in str(err).lower() or isinstance(err, MemoryError):
        return "oom"
    return "error"


def previous_run_id(run_dir: Path, cfg: DictConfig) -> str | None:
    """The run id of an earlier attempt of this run in the same directory (an interrupted or failed one),
    so the resumed run's record replaces its record in the results store instead of adding one."""
    try:
        old = read_record(run_dir / RECORD_FILE)
    except (OSError, ValueError, TypeError):
        return None
    same = (old.study, old.seed, old.method, old.model, old.task) == (
        cfg.study,
        cfg.seed,
        cfg.method.get("name"),
        cfg.model.get("name"),
        cfg.task.get("name"),
    )
    return old.run_id if same and isinstance(old.run_id, str) else None


def resume_hint(run_dir: Path) -> str:
    """How to continue an interrupted run: the same command in the same run directory."""
    try:
        overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("hydra.run.dir=")]
    except ValueError:
        overrides = []
    return " ".join(["python -m peftbench.run", *overrides, f"hydra.run.dir={run_dir}"])


def run(cfg: DictConfig) -> Record:
    """Train and record one run; a failure is recorded too (status `failed`, the error) and re-raised, an
    interrupt (SIGINT/SIGTERM) as status `interrupted` with the checkpoint to resume from."""
    from peftbench.checkpointing import CHECKPOINT_DIR
    from peftbench.console import print_stages, print_summary
    from peftbench.environment import environment
    from peftbench.interrupts import INTERRUPTS, RunInterrupted
    from peftbench.redaction import install_log_redaction, redact_files
    from peftbench.resume import newest_checkpoint
    from peftbench.stages import run_stages

    store = Path(cfg.results_dir) / cfg.study
    run_dir = output_dir()
    install_log_redaction()
    redact_files(run_dir / ".hydra")
    env = environment()  # the machine as the run starts (its load average, before this run adds to it)
    rid = previous_run_id(run_dir, cfg) or new_run_id(cfg)

    def ended(status: str, **fields: Any) -> Record:
        """The record of a run that did not finish."""
        names = {k: cfg[k].get("name") for k in ("method", "model", "task")}
        config = OmegaConf.to_container(cfg, resolve=False)
        return Record(rid, status, cfg.study, seed=cfg.seed, config=config, env=env, **names, **fields)  # type: ignore[arg-type]

    INTERRUPTS.install()
    try:
        record, _ = (run_stages if cfg.get("stages") else run_single)(cfg, rid)
        record.env = env
        if _rank_zero():
            write_record(record, run_dir, store)
    except RunInterrupted as err:
        record = ended(
            "interrupted",
            signal=err.signal_name,
            step=err.step,
            checkpoint=str(err.checkpoint) if err.checkpoint else newest_checkpoint(run_dir),
            resume=resume_hint(run_dir),
            error=str(err),
        )
        if _rank_zero():
            write_record(record, run_dir, store)
        raise
    except Exception as err:
        record = ended(
            "failed",
            failure=failure_kind(err),
            error=f"{type(err).__name__}: {err}",
            checkpoint=newest_checkpoint(run_dir),
            traceback=None if isinstance(err, ConfigError) else traceback.format_exc(),
        )
        if _rank_zero():
            write_record(record, run_dir, store)
        raise
    finally:
        INTERRUPTS.restore()
    if _rank_zero():
        print_summary(record)
        if record.stages:
            print_stages(record)
        if not cfg.checkpoint.get("keep_on_success", True):
            shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)
    return record


# an absolute path: Hydra reads it as a directory whether peftbench runs as `python -m peftbench.run` or as
# the `peftbench` command (a relative one would name a Python package there), from a clone or a wheel
@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """The Hydra task function. Returns the validation score a sweeper (Optuna) maximises, or None."""
    from peftbench.interrupts import RunInterrupted
    from peftbench.redaction import redact

    try:
        record = run(cfg)
    except RunInterrupted as err:
        # a person or the scheduler stopped it: end the whole sweep too, non-zero (128 + signal number)
        print(f"error: {err}; to resume: {resume_hint(output_dir())}", file=sys.stderr)
        sys.exit(128 + err.signum)
    except ConfigError as err:
        print(f"error: {redact(str(err))}", file=sys.stderr)
        if _is_multirun():
            return None  # recorded as failed; the other jobs of the sweep go on
        sys.exit(2)
    except Exception as err:
        if _is_multirun():
            print(
                f"error: run failed and was recorded as failed: {type(err).__name__}: {redact(str(err))}",
                file=sys.stderr,
            )
            return None
        raise
    return objective(record)  # val/<primary metric>: tuning never sees the test split


def check_overrides(argv: Sequence[str]) -> None:
    """Compose a single run's overrides before Hydra does, so an unknown key is one line, not a paragraph.
    Skipped when Hydra flags are given (`-m`, `--cfg`, ...): Hydra handles those itself."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    if any(arg.startswith("-") for arg in argv):
        return
    overrides = [a for a in argv if "=" in a and not a.lstrip("+~").startswith(("hydra.", "hydra/"))]
    searchpath = [a for a in argv if a.lstrip("+~").startswith("hydra.searchpath=")]  # a user's own configs
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as err:
        raise ConfigError(composition_error(err, overrides)) from None
    # sweep values (an experiment may set hydra.mode=MULTIRUN without -m) are Hydra's to expand
    load_config([o.input_line for o in parsed if not o.is_sweep_override() and o.input_line] + searchpath)


def cli() -> None:
    """`python -m peftbench.run` / `peftbench`: check group names and keys first, then hand over to Hydra."""
    from peftbench.cli_checks import check_group_overrides

    try:
        check_group_overrides(sys.argv[1:])
        check_overrides(sys.argv[1:])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    main()


if __name__ == "__main__":
    cli()
