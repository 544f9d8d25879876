"""Hydra entry point: compose -> load model -> apply method -> fit -> test -> record.

python -m peftbench.run method=vera task=summarization
python -m peftbench.run -m method=lora,lora_fa,vera seed=0,1,2
"""

from __future__ import annotations

import os
import sys
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from peftbench.errors import ConfigError

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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


def train_and_record(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """One run. Returns `(record, objects)`; raises ConfigError on bad input before training."""
    import lightning as L
    import torch

    from peftbench.loggers import build_logger
    from peftbench.methods import build_method
    from peftbench.methods.io import save_adapter
    from peftbench.models import load_model
    from peftbench.module import PeftModule
    from peftbench.optim import check_optim_config
    from peftbench.progress import build_callbacks
    from peftbench.summary import parameter_report
    from peftbench.untuned import untuned_metrics

    started = time.perf_counter()
    run_dir = _run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    # Everything that can be wrong with the input is checked here, before any training.
    method = build_method(OmegaConf.to_container(cfg.method, resolve=True))
    check_optim_config(cfg.optim)
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size={cfg.batch_size!r} is not valid; accepted: an integer >= 1")
    from peftbench.tasks import build_task

    task = build_task(cfg.task)
    model, tokenizer = load_model(cfg.model)
    task.setup(tokenizer, cfg.seed)
    base_report = parameter_report(model)
    head = task.head(model)
    method.apply(model, head=head)
    task.use_reference(lambda: method.disabled(model))
    params = {
        **parameter_report(model, base_total=base_report["total"]),
        "base_modified": method.modifies_base,
    }

    flat_config = OmegaConf.to_container(cfg, resolve=True)
    logger = build_logger(cfg, run_dir, flat_config)
    module = PeftModule(model, method, task, cfg.optim)
    trainer = L.Trainer(
        **OmegaConf.to_container(cfg.trainer, resolve=True),
        logger=logger,
        callbacks=build_callbacks(),
        default_root_dir=str(run_dir),
    )
    metrics: dict[str, float] = {}
    timings: dict[str, float] = {}
    test_loader = task.test_dataloader(cfg.batch_size)
    if cfg.evaluate_before:
        t0 = time.perf_counter()

        def evaluate_untuned() -> dict[str, float]:
            before = trainer.test(module, dataloaders=test_loader, verbose=False)[0]
            return {k.replace("test/", "test_before/"): float(v) for k, v in before.items()}

        before, reused = untuned_metrics(cfg, method, evaluate_untuned)
        metrics |= before
        timings["eval_before_s"] = time.perf_counter() - t0
        timings["eval_before_reused"] = reused
    t0 = time.perf_counter()
    trainer.fit(
        module,
        train_dataloaders=task.train_dataloader(cfg.batch_size),
        val_dataloaders=task.val_dataloader(cfg.batch_size),
    )
    timings["fit_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    after = trainer.test(module, dataloaders=test_loader, verbose=False)[0]
    timings["test_s"] = time.perf_counter() - t0
    metrics |= {k: float(v) for k, v in after.items()}
    if module.val_history:
        metrics |= {k: float(v) for k, v in module.val_history[-1].items() if k.startswith("val/")}

    adapter_bytes = None
    if cfg.save_adapter:
        adapter_path = save_adapter(model, method, run_dir / "adapter")
        adapter_bytes = adapter_path.stat().st_size
    timings["train_step_s"] = module.train_seconds / max(1, len(module.loss_history))
    timings["total_s"] = time.perf_counter() - started
    record = {
        "run_id": run_id(cfg),
        "status": "ok",
        "study": cfg.study,
        "method": method.name,
        "model": cfg.model.name,
        "task": cfg.task.name,
        "seed": cfg.seed,
        "primary_metric": f"test/{task.primary_metric}",
        "metrics": metrics,
        "params": {**params, "adapter_bytes": adapter_bytes},
        "memory": {"peak_train_bytes": module.peak_train_bytes, "device": str(module.device)},
        "time": timings,
        "tokens_per_s": module.train_tokens / module.train_seconds if module.train_seconds else None,
        "steps": trainer.global_step,
        "train_tokens": module.train_tokens,
        "history": {"train_loss": module.loss_history, "val": module.val_history},
        "data": task.split_sizes(),
        "method_config": method.hyperparameters(),
        "config": flat_config,
        "run_dir": str(run_dir),
    }
    if logger:
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


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train and record one run; a failure is recorded too (status `failed`, the error) and re-raised."""
    from peftbench.records import environment, write_record
    from peftbench.summary import print_summary

    store = Path(cfg.results_dir) / cfg.study
    try:
        record, _ = train_and_record(cfg)
    except Exception as err:
        record = {
            "run_id": run_id(cfg),
            "status": "failed",
            "failure": failure_kind(err),
            "error": f"{type(err).__name__}: {err}",
            "study": cfg.study,
            "method": cfg.method.get("name"),
            "model": cfg.model.get("name"),
            "task": cfg.task.get("name"),
            "seed": cfg.seed,
            "config": OmegaConf.to_container(cfg, resolve=False),
        }
        if not isinstance(err, ConfigError):
            record["traceback"] = traceback.format_exc()
        write_record({**record, "env": environment()}, _run_dir(), store)
        raise
    write_record({**record, "env": environment()}, _run_dir(), store)
    print_summary(record)
    return record


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """The Hydra task function. Returns the primary test metric (for sweepers such as Optuna)."""
    try:
        record = run(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        if _is_multirun():
            return None  # recorded as failed; the other jobs of the sweep go on
        sys.exit(2)
    except Exception as err:
        if _is_multirun():
            print(
                f"error: run failed and was recorded as failed: {type(err).__name__}: {err}", file=sys.stderr
            )
            return None
        raise
    return record["metrics"].get(record["primary_metric"])


def cli() -> None:
    """`python -m peftbench.run` / `peftbench`: check group names first, then hand over to Hydra."""
    from peftbench.cli_checks import check_group_overrides

    try:
        check_group_overrides(sys.argv[1:])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    main()


if __name__ == "__main__":
    cli()
