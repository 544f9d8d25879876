"""Hydra entry point: compose -> load model -> apply method -> fit -> test -> record.

python -m peftbench.run method=vera task=summarization
python -m peftbench.run -m method=lora,lora_fa,vera seed=0,1,2

A run checkpoints every `checkpoint.every_n_steps` optimizer steps into `<run dir>/checkpoints` and resumes
from there (`resume=auto`, the default) when launched again in the same directory:
python -m peftbench.run method=vera hydra.run.dir=outputs/default/vera/seed0-20250101-120000
python -m peftbench.run method=vera resume=outputs/default/vera/seed0-20250101-120000   # or a .ckpt file
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
import traceback
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from peftbench.errors import ConfigError
from peftbench.tuned import objective, register_resolvers
from peftbench.validation import composition_error, load_config, processes, validate_config

if TYPE_CHECKING:
    from peftbench.stages import Carry

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
register_resolvers()  # ${peftbench.scale:...}, ${peftbench.sqlite:...} in conf/sweep/
log = logging.getLogger(__name__)


def _run_dir() -> Path:
    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # composed outside @hydra.main (tests, notebooks)
        return Path.cwd()


def _is_multirun() -> bool:
    try:
        return HydraConfig.get().mode.name == "MULTIRUN"
    except ValueError:
        return False


def _rank_zero() -> bool:
    """True in the process that writes records and adapters (the only one outside distributed runs)."""
    from lightning.pytorch.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


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


def seeds(cfg: DictConfig, method: Any) -> dict[str, Any]:
    """Every seed the run depends on: `seed` (adapter init, dropout; also the training-data order) and, where
    they are separate, the random model's init seed and the method's own seeds (VeRA's projections)."""
    found: dict[str, Any] = {"seed": cfg.seed, "data_order": cfg.seed}
    if cfg.model.get("seed") is not None:
        found["model_init"] = cfg.model.seed  # a random model's weights, a new classification head
    for key, value in method.hyperparameters().items():
        if key.endswith("seed"):
            found[f"method.{key}"] = value
    return found


# ----- one run --------------------------------------------------------------------------------------------
def train_and_record(
    cfg: DictConfig, run_id_: str | None = None, carry: Carry | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One run. Returns `(record, objects)`; raises ConfigError on bad input before training. With `carry`
    it is one stage of a stages run (peftbench/stages.py): the model and adapter the stage before left."""
    import lightning as L
    import torch

    from peftbench.checkpointing import (
        INTERRUPTS,
        LAST,
        RunInterrupted,
        build_checkpointing,
        check_compatible,
        checkpointing_supported,
        expected_final_validation,
        own_generator,
        resolve_resume,
        resumable_train_loader,
    )
    from peftbench.export import export_after_training
    from peftbench.loggers import build_logger
    from peftbench.methods.io import save_adapter
    from peftbench.models import load_model
    from peftbench.models.params import count_parameters
    from peftbench.module import PeftModule
    from peftbench.padding import PaddingStats
    from peftbench.progress import build_callbacks
    from peftbench.records import redact
    from peftbench.summary import parameter_report
    from peftbench.tasks.common import check_enough_training_data
    from peftbench.tasks.sampler import group_by_length
    from peftbench.untuned import untuned_metrics

    started = time.perf_counter()
    run_dir = _run_dir() if carry is None else carry.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    # validation and test run on the whole split in every process (exact, equal metrics): Lightning's
    # advice to sync epoch-level metrics across processes does not apply
    warnings.filterwarnings("ignore", message=r".*sync_dist=True.*")

    # Everything that can be wrong with the input is checked here, before any training.
    from peftbench.budget import apply_budget
    from peftbench.tuned import apply_tuned

    apply_tuned(cfg)  # tuned=<tuned.yaml>: this method's tuned lr (peftbench/tuned.py)
    apply_budget(cfg)  # budget.trainable_params: the method's size knob fitted (peftbench/budget.py)
    method, task = validate_config(cfg)
    resume = resolve_resume(cfg.get("resume", "auto"), run_dir)
    if resume is not None and not checkpointing_supported(cfg.trainer.get("strategy", "auto")):
        if cfg.get("resume") != "auto":
            raise ConfigError(
                f"resume={cfg.resume!r} is not supported with trainer.strategy="
                f"{cfg.trainer.get('strategy')!r}; accepted: resume=null, or trainer=default / trainer=ddp"
            )
        log.warning("not resuming from %s: trainer.strategy does not support it", resume.path)
        resume = None
    fingerprint = config_fingerprint(cfg, method)
    if resume is not None:
        check_compatible(resume, fingerprint)
        run_id_ = resume.checkpoint.get("peftbench_state", {}).get("run_id") or run_id_
    run_id_ = run_id_ or run_id(cfg)
    if carry is None:
        model, tokenizer = load_model(cfg.model)
        task.setup(tokenizer, cfg.seed)
        base_report = parameter_report(model)
        head = task.head(model)
        method.apply(model, head=head)
    else:
        model, tokenizer, method, base_report, head = carry.continue_with(task, cfg.seed)
    check_enough_training_data(task.name, task.split_sizes()["train"], cfg.batch_size, processes(cfg.trainer))
    task.use_reference(lambda: method.disabled(model))
    params = {
        **parameter_report(model, base_total=base_report["total"]),
        "base_modified": method.modifies_base,
        "head_trainable": count_parameters(head, trainable_only=True) if head is not None else 0,
    }
    if resume is not None:
        expected = {f"model.{k}" for k in method.adapter_state_dict(model)}
        if set(resume.checkpoint["state_dict"]) != expected:
            raise ConfigError(
                f"resume={str(resume.path)!r} holds other adapter tensors than this method builds "
                f"({len(resume.checkpoint['state_dict'])} vs {len(expected)}); accepted: a checkpoint of the "
                "same method and model (or resume=null)"
            )
    resumed_from = (
        {"checkpoint": str(resume.path), "step": resume.step, "skipped": resume.skipped} if resume else None
    )
    resume_path = str(resume.path) if resume else None
    del resume  # its tensors are loaded again by Lightning; free them now

    flat_config = redact(OmegaConf.to_container(cfg, resolve=True))
    logger = build_logger(cfg, run_dir, flat_config)
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    compile_model = bool(trainer_kwargs.pop("compile", False))  # peftbench's option, not a Trainer kwarg
    module = PeftModule(model, method, task, cfg.optim, compile=compile_model)
    train_loader = resumable_train_loader(task.train_dataloader(cfg.batch_size), cfg.seed)
    if cfg.task.get("group_by_length", False):  # similar lengths per batch: less padding (tasks/sampler.py)
        group_by_length(train_loader)
    padding = PaddingStats()
    val_loader = own_generator(task.val_dataloader(cfg.batch_size))
    test_loader = own_generator(task.test_dataloader(cfg.batch_size))
    checkpointing = build_checkpointing(cfg, run_dir, train_loader, fingerprint, run_id_)
    trainer_kwargs["enable_checkpointing"] = checkpointing.enabled
    if isinstance(trainer_kwargs.get("strategy"), dict):  # e.g. conf/trainer/fsdp.yaml: a `_target_` class
        trainer_kwargs["strategy"] = hydra.utils.instantiate(trainer_kwargs["strategy"])
    trainer = L.Trainer(
        **trainer_kwargs,
        logger=logger,
        callbacks=build_callbacks() + checkpointing.callbacks + [padding],
        plugins=checkpointing.plugins or None,
        default_root_dir=str(run_dir),
    )
    metrics: dict[str, float] = {}
    timings: dict[str, float] = {}
    if cfg.evaluate_before:
        t0 = time.perf_counter()

        def evaluate_untuned() -> dict[str, float]:
            before = trainer.test(module, dataloaders=test_loader, verbose=False)[0]
            return {k.replace("test/", "test_before/"): float(v) for k, v in before.items()}

        if carry is None or carry.untuned:
            before, reused = untuned_metrics(cfg, method, evaluate_untuned)
        else:  # a later stage starts from the adapter of the stage before, not from the untuned model
            before, reused = evaluate_untuned(), False
        metrics |= before
        timings["eval_before_s"] = time.perf_counter() - t0
        timings["eval_before_reused"] = reused
    t0 = time.perf_counter()
    try:
        trainer.fit(
            module,
            train_dataloaders=train_loader,
            val_dataloaders=val_loader,
            ckpt_path=resume_path,
            weights_only=True,
        )
    except (SystemExit, KeyboardInterrupt):  # Lightning turns SIGTERM during validation into SystemExit
        if INTERRUPTS.signum is None:
            raise
        last = checkpointing.dirpath / LAST if checkpointing.dirpath else None
        raise RunInterrupted(INTERRUPTS.signum, trainer.global_step, last) from None
    timings["fit_s"] = time.perf_counter() - t0
    if (
        resumed_from is not None
        and resumed_from["step"] == trainer.global_step
        and expected_final_validation(cfg, trainer.global_step)
        and not any(h.get("step") == trainer.global_step for h in module.val_history)
    ):
        # killed after the final checkpoint, before its validation: Lightning resumes past it
        trainer.validate(module, dataloaders=val_loader, verbose=False)
    t0 = time.perf_counter()
    after = trainer.test(module, dataloaders=test_loader, verbose=False)[0]
    timings["test_s"] = time.perf_counter() - t0
    metrics |= {k: float(v) for k, v in after.items()}
    if module.val_history:
        metrics |= {k: float(v) for k, v in module.val_history[-1].items() if k.startswith("val/")}

    adapter_bytes = peft_adapter = None
    if cfg.save_adapter and trainer.is_global_zero:  # rank 0 writes (DDP replicas hold the same adapter)
        adapter_path = save_adapter(model, method, run_dir / "adapter")
        adapter_bytes = adapter_path.stat().st_size
        # the same adapter in HF PEFT's format, where the method has one (peftbench/export.py)
        peft_adapter = export_after_training(model, method, adapter_path.parent)
    timings["train_step_s"] = module.train_seconds / max(1, len(module.loss_history))
    timings["total_s"] = time.perf_counter() - started
    record = {
        "run_id": run_id_,
        "status": "ok",
        "study": cfg.study,
        "method": method.name,
        "model": cfg.model.name,
        "task": cfg.task.name,
        "seed": cfg.seed,
        "seeds": seeds(cfg, method),
        "primary_metric": f"test/{task.primary_metric}",
        "metrics": metrics,
        "params": {**params, "adapter_bytes": adapter_bytes, "peft_adapter": peft_adapter},
        "memory": {"peak_train_bytes": module.peak_train_bytes, "device": str(module.device)},
        "time": timings,
        "tokens_per_s": module.train_tokens / module.train_seconds if module.train_seconds else None,
        "steps": trainer.global_step,
        "train_tokens": module.train_tokens,
        "padding": {**padding.summary(), "group_by_length": bool(cfg.task.get("group_by_length", False))},
        "history": {"train_loss": module.loss_history, "val": module.val_history},
        "data": task.split_sizes(),
        "method_config": method.hyperparameters(),
        "world_size": trainer.world_size,
        "resumed_from": resumed_from,
        "checkpoints": str(checkpointing.dirpath) if checkpointing.dirpath else None,
        "config": flat_config,
        "run_dir": str(run_dir),
    }
    if logger and trainer.is_global_zero:
        logger.log_hyperparams({"params": record["params"]})
        logger.experiment.summary.update({k: v for k, v in metrics.items()})
        logger.finalize("success")
        import wandb

        wandb.finish()
    if torch.cuda.is_available():
        record["memory"]["device_name"] = torch.cuda.get_device_name(0)
    return record, {"model": model, "method": method, "task": task, "trainer": trainer, "module": module}


def run_id(cfg: DictConfig) -> str:
    return f"{cfg.study}-{cfg.method.name}-{cfg.task.name}-seed{cfg.seed}-{uuid.uuid4().hex[:8]}"


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
        old = json.loads((run_dir / "record.json").read_text())
    except (OSError, ValueError):
        return None
    same = all(
        old.get(key) == value
        for key, value in (
            ("study", cfg.study),
            ("seed", cfg.seed),
            ("method", cfg.method.get("name")),
            ("model", cfg.model.get("name")),
            ("task", cfg.task.get("name")),
        )
    )
    return old.get("run_id") if same and isinstance(old.get("run_id"), str) else None


def _newest_checkpoint(run_dir: Path) -> str | None:
    from peftbench.checkpointing import CHECKPOINT_DIR, candidates

    found = candidates(run_dir / CHECKPOINT_DIR)
    return str(found[0]) if found else None


def resume_hint(run_dir: Path) -> str:
    """How to continue an interrupted run: the same command in the same run directory."""
    try:
        overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("hydra.run.dir=")]
    except ValueError:
        overrides = []
    return " ".join(["python -m peftbench.run", *overrides, f"hydra.run.dir={run_dir}"])


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train and record one run; a failure is recorded too (status `failed`, the error) and re-raised, an
    interrupt (SIGINT/SIGTERM) as status `interrupted` with the checkpoint to resume from."""
    from peftbench.checkpointing import CHECKPOINT_DIR, INTERRUPTS, RunInterrupted
    from peftbench.records import environment, install_log_redaction, redact_files, write_record
    from peftbench.stages import print_stages, run_stages
    from peftbench.summary import print_summary

    store = Path(cfg.results_dir) / cfg.study
    run_dir = _run_dir()
    install_log_redaction()
    redact_files(run_dir / ".hydra")
    rid = previous_run_id(run_dir, cfg) or run_id(cfg)

    def base() -> dict[str, Any]:
        return {
            "run_id": rid,
            "study": cfg.study,
            "method": cfg.method.get("name"),
            "model": cfg.model.get("name"),
            "task": cfg.task.get("name"),
            "seed": cfg.seed,
            "config": OmegaConf.to_container(cfg, resolve=False),
        }

    INTERRUPTS.install()
    try:
        record, _ = (run_stages if cfg.get("stages") else train_and_record)(cfg, rid)
        if _rank_zero():
            write_record({**record, "env": environment()}, run_dir, store)
    except RunInterrupted as err:
        record = {
            **base(),
            "status": "interrupted",
            "signal": err.signal_name,
            "step": err.step,
            "checkpoint": str(err.checkpoint) if err.checkpoint else _newest_checkpoint(run_dir),
            "resume": resume_hint(run_dir),
            "error": str(err),
        }
        if _rank_zero():
            write_record({**record, "env": environment()}, run_dir, store)
        raise
    except Exception as err:
        record = {
            **base(),
            "status": "failed",
            "failure": failure_kind(err),
            "error": f"{type(err).__name__}: {err}",
            "checkpoint": _newest_checkpoint(run_dir),
        }
        if not isinstance(err, ConfigError):
            record["traceback"] = traceback.format_exc()
        if _rank_zero():
            write_record({**record, "env": environment()}, run_dir, store)
        raise
    finally:
        INTERRUPTS.restore()
    if _rank_zero():
        print_summary(record)
        if record.get("stages"):
            print_stages(record)
        if not cfg.checkpoint.get("keep_on_success", True):
            shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)
    return record


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """The Hydra task function. Returns the validation score a sweeper (Optuna) maximises, or None."""
    from peftbench.checkpointing import RunInterrupted
    from peftbench.records import redact

    try:
        record = run(cfg)
    except RunInterrupted as err:
        # a person or the scheduler stopped it: end the whole sweep too, non-zero (128 + signal number)
        print(f"error: {err}; to resume: {resume_hint(_run_dir())}", file=sys.stderr)
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
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as err:
        raise ConfigError(composition_error(err, overrides)) from None
    # sweep values (an experiment may set hydra.mode=MULTIRUN without -m) are Hydra's to expand
    load_config([o.input_line for o in parsed if not o.is_sweep_override() and o.input_line])


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
