"""Train one built run (peftbench/build.py) and record it: the untuned score, fit (resuming where a
checkpoint says), test, the adapter saved and exported, the record. Nothing here rewrites the config or
builds the model: `train(cfg, built, run_dir)` takes both as they are.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from peftbench.build import Built
from peftbench.record import History, Memory, Params, Record, Timings, rollout_summary
from peftbench.resume import Resume, check_adapter, validate_if_missed


@dataclass
class Trained:
    """A trained run: its record, and the Lightning trainer and module that trained it."""

    record: Record
    trainer: Any
    module: Any


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


def train(
    cfg: DictConfig,
    built: Built,
    run_dir: Path,
    *,
    run_id: str,
    fingerprint: dict[str, Any],
    resume: Resume | None = None,
    untuned: bool = True,
    started: float | None = None,
) -> Trained:
    """Fit and test `built`, save its adapter, return its record. `fingerprint`: what a checkpoint of this
    run must match to resume it; `resume`: the checkpoint it continues from; `untuned`: the model is the
    untuned base, so its score before training may come from the study's cache
    (peftbench/untuned_score.py)."""
    import hydra
    import lightning as L
    import torch

    from peftbench.checkpointing import LAST, build_checkpointing
    from peftbench.export import export_after_training
    from peftbench.interrupts import stop_as_interrupt
    from peftbench.loggers import build_logger
    from peftbench.methods.io import save_adapter
    from peftbench.models.params import count_parameters, parameter_report
    from peftbench.module import PeftModule
    from peftbench.padding import PaddingStats
    from peftbench.progress import build_callbacks
    from peftbench.redaction import redact
    from peftbench.tasks.sampler import group_by_length, own_generator, resumable_train_loader
    from peftbench.untuned_score import untuned_metrics

    started = time.perf_counter() if started is None else started
    model, method, task, head = built.model, built.method, built.task, built.head
    run_dir.mkdir(parents=True, exist_ok=True)
    # validation and test run on the whole split in every process (exact, equal metrics): Lightning's
    # advice to sync epoch-level metrics across processes does not apply
    warnings.filterwarnings("ignore", message=r".*sync_dist=True.*")
    params = {
        **parameter_report(model, base_total=built.base_total),
        "base_modified": method.modifies_base,
        "head_trainable": count_parameters(head, trainable_only=True) if head is not None else 0,
        # an image model's projector trains beside the method (peftbench/models/multimodal.py)
        "projector_trainable": getattr(model, "projector_parameters", lambda: None)(),
    }
    if resume is not None:
        check_adapter(resume, method, model)
        resume.release()  # its tensors are loaded again by Lightning; free them now

    flat_config = redact(OmegaConf.to_container(cfg, resolve=True))
    logger = build_logger(cfg, run_dir, flat_config)
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    compile_model = bool(trainer_kwargs.pop("compile", False))  # peftbench's option, not a Trainer kwarg
    module = PeftModule(model, method, task, cfg.optim, compile=compile_model)
    if not module.automatic_optimization:  # the task steps the optimizer (tasks/stepping.py): clip there
        module.manual_clip = (
            trainer_kwargs.pop("gradient_clip_val", None),
            trainer_kwargs.pop("gradient_clip_algorithm", None),
        )
    train_loader = resumable_train_loader(task.train_dataloader(cfg.batch_size), cfg.seed)
    if cfg.task.get("group_by_length", False):  # similar lengths per batch: less padding (tasks/sampler.py)
        group_by_length(train_loader)
    padding = PaddingStats()
    val_loader = own_generator(task.val_dataloader(cfg.batch_size))
    test_loader = own_generator(task.test_dataloader(cfg.batch_size))
    checkpointing = build_checkpointing(cfg, run_dir, train_loader, fingerprint, run_id)
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
    timings = Timings()
    if cfg.evaluate_before:
        t0 = time.perf_counter()

        def evaluate_untuned() -> dict[str, float]:
            before = trainer.test(module, dataloaders=test_loader, verbose=False)[0]
            return {k.replace("test/", "test_before/"): float(v) for k, v in before.items()}

        if untuned:
            before, reused = untuned_metrics(cfg, method, evaluate_untuned)
        else:  # a later stage starts from the adapter of the stage before, not from the untuned model
            before, reused = evaluate_untuned(), False
        metrics |= before
        timings.eval_before_s = time.perf_counter() - t0
        timings.eval_before_reused = reused
    t0 = time.perf_counter()
    with stop_as_interrupt(trainer, checkpointing.dirpath / LAST if checkpointing.dirpath else None):
        trainer.fit(
            module,
            train_dataloaders=train_loader,
            val_dataloaders=val_loader,
            ckpt_path=str(resume.path) if resume else None,
            weights_only=True,
        )
    timings.fit_s = time.perf_counter() - t0
    validate_if_missed(cfg, resume, trainer, module, val_loader)
    t0 = time.perf_counter()
    after = trainer.test(module, dataloaders=test_loader, verbose=False)[0]
    timings.test_s = time.perf_counter() - t0
    metrics |= {k: float(v) for k, v in after.items()}
    if module.val_history:
        metrics |= {k: float(v) for k, v in module.val_history[-1].items() if k.startswith("val/")}

    adapter_bytes = peft_adapter = None
    if cfg.save_adapter and trainer.is_global_zero:  # rank 0 writes (DDP replicas hold the same adapter)
        adapter_path = save_adapter(model, method, run_dir / "adapter")
        adapter_bytes = adapter_path.stat().st_size
        # the same adapter in HF PEFT's format, where the method has one (peftbench/export.py)
        peft_adapter = export_after_training(model, method, adapter_path.parent)
        save_task_files = getattr(task, "save_with_adapter", None)
        if save_task_files is not None:  # a task's own files beside the adapter (a reward model's)
            save_task_files(adapter_path.parent)
    timings.train_step_s = module.train_seconds / max(1, len(module.loss_history))
    timings.total_s = time.perf_counter() - started
    record = Record(
        run_id=run_id,
        status="ok",
        study=cfg.study,
        method=method.name,
        model=cfg.model.name,
        task=cfg.task.name,
        seed=cfg.seed,
        seeds=seeds(cfg, method),
        primary_metric=f"test/{task.primary_metric}",
        metrics=metrics,
        params=Params(**params, adapter_bytes=adapter_bytes, peft_adapter=peft_adapter),
        memory=Memory(
            peak_train_bytes=module.peak_train_bytes,
            device=str(module.device),
            device_name=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        ),
        time=timings,
        tokens_per_s=module.train_tokens / module.train_seconds if module.train_seconds else None,
        steps=trainer.global_step,
        train_tokens=module.train_tokens,
        padding={**padding.summary(), "group_by_length": bool(cfg.task.get("group_by_length", False))},
        history=History(train_loss=module.loss_history, val=module.val_history),
        data=task.split_sizes(),
        method_config=method.describe(),
        world_size=trainer.world_size,
        resumed_from=resume.summary() if resume else None,
        rollouts=rollout_summary(module.step_stats),
        checkpoints=str(checkpointing.dirpath) if checkpointing.dirpath else None,
        config=flat_config,
        run_dir=str(run_dir),
    )
    if logger and trainer.is_global_zero:
        logger.log_hyperparams({"params": dataclasses.asdict(record.params)})
        from peftbench.compare.wandb_metrics import run_summary  # the keys the dashboards read

        logger.experiment.summary.update({**metrics, **run_summary(record)})
        logger.finalize("success")
        import wandb

        wandb.finish()
    return Trained(record, trainer, module)
