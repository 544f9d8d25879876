"""Two-phase (continual) fine-tuning: one adapter trained on several tasks in turn, and what it forgets.

A run that declares `stages:` trains the same model and the same method's adapter on each stage's task in
turn, as in the two-phase multilingual recipe (tune on one task, then go on tuning on another): the adapter
at the end of stage k is where stage k+1 starts. The model and the method are built once
(`build.build_base`); each stage attaches its task (`build.attach_task`) and trains once (`train.train`:
a fresh optimizer and learning-rate schedule, its own `trainer.max_steps` and `optim.lr` when the stage
sets them):

    stages:
      - task: classification             # the name of a conf/task/<name>.yaml
        task_overrides: {formulation: verbaliser}   # keys of that task config (optional)
        max_steps: 30                    # this stage's trainer.max_steps (optional)
        lr: 1.0e-3                       # this stage's optim.lr (optional)
        name: sentiment                  # unique label (optional; default: the task config's name)
        freeze: {freeze_language_model: true}   # an image model's freeze switches in this stage (optional)
      - task: summarization

After each stage its own task is tested (`stages[k].metrics`, `test_before/*` being the model as the stage
found it); after the last stage every earlier stage's task is tested again (`stages[k].metrics_after_last`)
and `forgetting[name]` holds that stage's primary test metric after its own stage, after the last stage,
and `change` = after last - after own stage (negative: forgotten).

Files: stage k works in `<run dir>/stages/<k>-<name>/` (its checkpoints, `adapter/`, `record.json`); the
stages finished so far are listed in `<run dir>/stages.json`; the final adapter is `<run dir>/adapter/`.

Resume (`resume=auto`, launched again in the same run directory): finished stages are not trained again
(their records are read back and the adapter at the end of the last one is loaded), the interrupted stage
resumes from its own checkpoints as a single run does. A `stages.json` of another plan (other stages, task
configs, steps, lr, method, model or seed) is refused, and so is `resume=<path>`: one line each.
`resume=null` trains every stage afresh. Stages run in one process (`trainer.devices=1`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from peftbench.build import Built, attach_task, build_base, new_run_id, output_dir, seed_everything
from peftbench.errors import ConfigError, bad_value, is_int, is_number
from peftbench.record import Forgetting, History, Record, StageResult, from_plain, to_plain

log = logging.getLogger(__name__)

STAGE_KEYS = ("task", "name", "task_overrides", "max_steps", "lr", "freeze")
#: what a stage's `freeze` may set: an image model's switches (`model.vision`, models/multimodal.py)
FREEZE_KEYS = ("freeze_vision_tower", "freeze_multi_modal_projector", "freeze_language_model")
STATE_FILE = "stages.json"
STAGES_DIR = "stages"


def stage_dir(run_dir: Path, index: int, name: str) -> Path:
    """Where stage `index` (0-based) works: `<run dir>/stages/<index + 1>-<name>`."""
    return run_dir / STAGES_DIR / f"{index + 1}-{name}"


@dataclass(frozen=True)
class Stage:
    """One entry of `stages:`, checked."""

    name: str
    task: str
    task_overrides: dict[str, Any]
    max_steps: int | None
    lr: float | None
    freeze: dict[str, bool] | None = None


# ----- the plan ------------------------------------------------------------------------------------------
def task_names(conf_dir: Path | None = None) -> list[str]:
    """The task configs a stage may name: `conf/task/*.yaml`."""
    from peftbench.cli_checks import CONF_DIR

    return sorted(p.stem for p in ((conf_dir or CONF_DIR) / "task").glob("*.yaml"))


def parse_stages(value: Any, conf_dir: Path | None = None) -> list[Stage]:
    """Check `stages:`; a one-line ConfigError naming the bad entry and what is accepted."""
    if isinstance(value, ListConfig | DictConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if not isinstance(value, list) or not value:
        raise bad_value("stages", value, "a non-empty list of {task: <conf/task name>, ...} mappings")
    known = task_names(conf_dir)
    stages: list[Stage] = []
    for i, entry in enumerate(value):
        where = f"stages[{i}]"
        if not isinstance(entry, dict):
            raise bad_value(where, entry, f"a mapping with keys {', '.join(STAGE_KEYS)} (task required)")
        unknown = sorted(str(k) for k in set(entry) - set(STAGE_KEYS))
        if unknown:
            raise ConfigError(
                f"{where} has unknown key(s) {', '.join(unknown)}; accepted: {', '.join(STAGE_KEYS)}"
            )
        task = entry.get("task")
        if task not in known:
            raise bad_value(f"{where}.task", task, known)
        overrides = entry.get("task_overrides") or {}
        if not isinstance(overrides, dict):
            raise bad_value(f"{where}.task_overrides", overrides, "a mapping of task config keys")
        steps = entry.get("max_steps")
        if steps is not None and (not is_int(steps) or steps < 1):
            raise bad_value(f"{where}.max_steps", steps, "an integer >= 1, or null (the run's)")
        lr = entry.get("lr")
        if lr is not None and (not is_number(lr) or not 0 < lr < 1e9):
            raise bad_value(f"{where}.lr", lr, "a finite number > 0, or null (the run's optim.lr)")
        name = entry.get("name", task)
        if not isinstance(name, str) or not name.strip() or "/" in name:
            raise bad_value(f"{where}.name", name, "a non-empty label without '/'")
        if name in {s.name for s in stages}:
            raise ConfigError(
                f"{where}.name={name!r} is already used by an earlier stage; accepted: a unique name "
                f"per stage (set stages[{i}].name)"
            )
        freeze = entry.get("freeze")
        if freeze is not None and (
            not isinstance(freeze, dict)
            or set(freeze) - set(FREEZE_KEYS)
            or not all(isinstance(v, bool) for v in freeze.values())
        ):
            raise bad_value(f"{where}.freeze", freeze, f"a mapping of {', '.join(FREEZE_KEYS)} to true/false")
        stages.append(Stage(name, task, overrides, steps, None if lr is None else float(lr), freeze))
    return stages


def stage_config(cfg: DictConfig, stage: Stage, conf_dir: Path | None = None) -> DictConfig:
    """The config of one stage: the run's, with `task` = conf/task/<stage.task>.yaml + its overrides, and the
    stage's max_steps / lr; no `stages` key. Interpolations (e.g. `val_check_interval:
    ${trainer.max_steps}`) follow the stage's values."""
    from peftbench.cli_checks import CONF_DIR

    plain = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(plain, dict)
    plain.pop("stages", None)
    task = OmegaConf.load((conf_dir or CONF_DIR) / "task" / f"{stage.task}.yaml")
    # unknown task keys are refused by `build_task` (validate_config), naming them
    plain["task"] = OmegaConf.to_container(OmegaConf.merge(task, stage.task_overrides))
    out = OmegaConf.create(plain)
    if stage.max_steps is not None:
        out.trainer.max_steps = stage.max_steps
    if stage.lr is not None:
        out.optim.lr = stage.lr
    if stage.freeze:  # the model is built once; its switches change per stage (build.attach_task)
        if out.model.get("vision") is None:
            raise ConfigError(
                f"stages: {stage.name}.freeze needs an image model; accepted: a model with model.vision "
                "(model=vision_smollm2, or model.vision={} for a LLaVA directory)"
            )
        for key, value in stage.freeze.items():
            out.model.vision[key] = value
    out.save_adapter = True  # a finished stage's adapter is where a resumed run starts the next one
    return out


def check_supported(cfg: DictConfig) -> None:
    """Stages run in one process (no multi-device or distributed trainer), with the method as configured
    (`tuned=` and `budget.trainable_params` would change each stage's method or lr on their own)."""
    from peftbench.checkpointing import strategy_name

    for key in ("tuned", "budget.trainable_params"):
        if OmegaConf.select(cfg, key, default=None) is not None:
            raise ConfigError(
                f"{key} is not supported with stages; accepted: {key}=null (set each stage's lr and the "
                "method's size in the config)"
            )

    strategy = strategy_name(cfg.trainer.get("strategy", "auto"))
    devices = cfg.trainer.get("devices", 1)
    if (
        strategy not in ("auto", "single_device")
        or str(devices) != "1"
        or cfg.trainer.get("num_nodes", 1) != 1
    ):
        raise ConfigError(
            f"stages with trainer.strategy={strategy!r}, trainer.devices={devices!r} are not supported; "
            "accepted: one process (trainer=default or trainer=gpu, trainer.devices=1)"
        )


def plan_fingerprint(cfg: DictConfig, stages: Sequence[Stage], configs: Sequence[DictConfig]) -> list[Any]:
    """What a resumed stages run must share with the run that wrote `stages.json`."""
    plan = [
        {
            "name": stage.name,
            "task": OmegaConf.to_container(c.task, resolve=True),
            "max_steps": c.trainer.max_steps,
            "lr": c.optim.lr,
            **({"freeze": stage.freeze} if stage.freeze else {}),
        }
        for stage, c in zip(stages, configs, strict=True)
    ]
    shared = {
        "method": OmegaConf.to_container(cfg.method, resolve=True),
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "seed": cfg.seed,
        "batch_size": cfg.batch_size,
    }
    return json.loads(json.dumps([shared, *plan], default=str))


# ----- evaluation ----------------------------------------------------------------------------------------
def evaluate(cfg: DictConfig, model: Any, method: Any, task: Any, root: Path) -> dict[str, float]:
    """Test `task` on the model as it is now (the same module and loader as a run's test pass)."""
    import lightning as L

    from peftbench.module import PeftModule
    from peftbench.tasks.sampler import own_generator

    trainer = L.Trainer(
        accelerator=cfg.trainer.get("accelerator", "auto"),
        devices=1,
        precision=cfg.trainer.get("precision", "32-true"),
        limit_test_batches=cfg.trainer.get("limit_test_batches", 1.0),
        deterministic=cfg.trainer.get("deterministic", False),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
    )
    module = PeftModule(model, method, task, cfg.optim)
    loader = own_generator(task.test_dataloader(cfg.batch_size))
    return {k: float(v) for k, v in trainer.test(module, dataloaders=loader, verbose=False)[0].items()}


# ----- the run ---------------------------------------------------------------------------------------------
def _load_state(path: Path, plan: list[Any], resume: Any) -> dict[str, Any] | None:
    if resume is None or str(resume).strip().lower() in ("null", "none", ""):
        return None
    if resume != "auto":
        raise ConfigError(
            f"resume={resume!r} is not supported for a stages run; accepted: resume=auto (launch again "
            "with the same hydra.run.dir) or resume=null"
        )
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path} is not readable ({err}); accepted: resume=null to start afresh") from None
    if state.get("plan") != plan:
        raise ConfigError(
            f"{path} was written by a stages run with other stages, method, model or seed; accepted: the "
            "same config to resume it, resume=null to start afresh, or another hydra.run.dir"
        )
    return state


def _start(cfg: DictConfig, method: Any, state: dict[str, Any] | None, run_dir: Path) -> Built:
    """Load the model and apply the method; on resume, load the adapter at the end of the last finished
    stage and make trainable again exactly what was trainable then (a task's head too)."""
    from safetensors.torch import load_file

    from peftbench.methods.io import ADAPTER_FILE

    base = build_base(cfg, method)
    done = state["done"] if state else []
    if done:
        last = done[-1]
        adapter = stage_dir(run_dir, len(done) - 1, last["name"]) / "adapter" / ADAPTER_FILE
        method.load_adapter_state_dict(base.model, load_file(str(adapter)))
        trainable = set(last["trainable"])
        for name, param in base.model.named_parameters():
            param.requires_grad_(name in trainable)
        if {n for n, p in base.model.named_parameters() if p.requires_grad} != trainable:
            raise ConfigError(
                f"{run_dir / STATE_FILE} names parameters this model lacks; accepted: resume=null"
            )
    return base


def _summary(record: Record, stage: Stage, index: int) -> StageResult:
    """A stage's entry in the run's record (its full record stays in its directory)."""
    assert record.memory and record.time and record.history and record.primary_metric  # an ok record
    return StageResult(
        index=index,
        name=stage.name,
        task=str(record.task),
        primary_metric=record.primary_metric,
        metrics=record.metrics,
        steps=int(record.steps or 0),
        max_steps=record.config["trainer"]["max_steps"],
        lr=record.config["optim"]["lr"],
        train_tokens=int(record.train_tokens or 0),
        time=record.time,
        peak_train_bytes=record.memory.peak_train_bytes,
        history=record.history,
        data=record.data or {},
        run_dir=str(record.run_dir),
        resumed_from=record.resumed_from,
    )


def _state(run_id: str, plan: list[Any], done: Sequence[StageResult], trainable: Sequence[list[str]]) -> Any:
    """`stages.json`: the plan and the stages finished so far, each with the parameters that trained."""
    entries = [{**to_plain(d), "trainable": t} for d, t in zip(done, trainable, strict=True)]
    return {"run_id": run_id, "plan": plan, "done": entries}


def run_stages(
    cfg: DictConfig, run_id: str | None = None, run_dir: Path | None = None
) -> tuple[Record, dict[str, Any]]:
    """Train every stage in turn, re-test the earlier stages' tasks, report forgetting: `(record, objects)`.
    ConfigError on bad input before any training. `run_dir`: default, Hydra's output directory."""
    from peftbench.files import atomic_write_json
    from peftbench.methods.io import save_adapter
    from peftbench.record import read_record, write_record
    from peftbench.redaction import redact
    from peftbench.resume import config_fingerprint, resume_for
    from peftbench.train import train
    from peftbench.validation import validate_config

    started = time.perf_counter()
    run_dir = run_dir or output_dir()
    stages = parse_stages(cfg.stages)
    configs = [stage_config(cfg, stage) for stage in stages]
    check_supported(cfg)
    checked = [validate_config(config) for config in configs]  # every stage checked before the first trains
    fingerprints = [
        config_fingerprint(config, method) for config, (method, _) in zip(configs, checked, strict=True)
    ]
    plan = plan_fingerprint(cfg, stages, configs)
    state_path = run_dir / STATE_FILE
    state = _load_state(state_path, plan, cfg.get("resume", "auto"))
    run_id = (state or {}).get("run_id") or run_id or new_run_id(cfg)
    done = [from_plain(StageResult, d) for d in state["done"]] if state else []
    trainable = [list(d["trainable"]) for d in state["done"]] if state else []
    base = _start(configs[0], checked[0][0], state, run_dir)
    if done:
        log.info("resuming a stages run: %s finished", ", ".join(d.name for d in done))
    tasks = [task for _, task in checked]
    last_record: Record | None = None
    where = run_dir
    for index, (stage, config) in enumerate(zip(stages, configs, strict=True)):
        where = stage_dir(run_dir, index, stage.name)
        if index < len(done):  # finished before an interruption: its task is set up for the re-test only
            attach_task(config, base, tasks[index])
            continue
        log.info("stage %d/%d: %s (task %s)", index + 1, len(stages), stage.name, config.task.name)
        seed_everything(config.seed)
        resume = resume_for(config, where, fingerprints[index])
        built = attach_task(config, base, tasks[index])
        record = train(
            config,
            built,
            where,
            run_id=(resume.run_id if resume else None) or f"{run_id}-stage{index + 1}",
            fingerprint=fingerprints[index],
            resume=resume,
            untuned=index == 0,  # a later stage starts from the adapter the stage before left
        ).record
        write_record(record, where, None)
        done.append(_summary(record, stage, index + 1))
        trainable.append([n for n, p in base.model.named_parameters() if p.requires_grad])
        atomic_write_json(state_path, _state(run_id, plan, done, trainable))
        last_record = record
    if last_record is None:  # every stage had finished: the last stage's record, as written
        last_record = read_record(where / "record.json")

    forgetting: dict[str, Forgetting] = {}
    for index in range(len(stages) - 1):  # every earlier stage's task, on the model after the last stage
        after = evaluate(configs[index], base.model, base.method, tasks[index], run_dir / STAGES_DIR)
        entry = done[index]
        entry.metrics_after_last = after
        key = entry.primary_metric
        own, now = entry.metrics[key], after[key]
        forgetting[entry.name] = Forgetting(key, after_own_stage=own, after_last_stage=now, change=now - own)
    if cfg.save_adapter:
        save_adapter(base.model, base.method, run_dir / "adapter")
    if not cfg.checkpoint.get("keep_on_success", True):
        from peftbench.checkpointing import CHECKPOINT_DIR

        for index, stage in enumerate(stages):
            shutil.rmtree(stage_dir(run_dir, index, stage.name) / CHECKPOINT_DIR, ignore_errors=True)

    steps = sum(d.steps for d in done)
    train_s = sum((d.time.train_step_s or 0.0) * len(d.history.train_loss) for d in done)
    assert last_record.memory and last_record.time  # an ok record
    record = dataclasses.replace(
        last_record,
        run_id=run_id,
        task="->".join(d.task for d in done),
        stages=done,
        forgetting=forgetting,
        steps=steps,
        train_tokens=sum(d.train_tokens for d in done),
        tokens_per_s=sum(d.train_tokens for d in done) / train_s if train_s else None,
        memory=dataclasses.replace(
            last_record.memory, peak_train_bytes=max(d.peak_train_bytes or 0 for d in done)
        ),
        time=dataclasses.replace(
            last_record.time,
            train_step_s=train_s / max(1, sum(len(d.history.train_loss) for d in done)),
            total_s=time.perf_counter() - started,
        ),
        history=_joined_history(done),
        data={d.name: d.data for d in done},
        checkpoints=None,
        resumed_from={"stages_done": len(state["done"])} if state else None,
        config=redact(OmegaConf.to_container(cfg, resolve=True)),
        run_dir=str(run_dir),
    )
    objects = {"model": base.model, "method": base.method, "tasks": tasks, "stages": stages}
    return record, objects


def _joined_history(done: Sequence[StageResult]) -> History:
    """The stages' training losses and validations on one step axis (each stage's steps after the last's)."""
    losses: list[Any] = []
    vals: list[dict[str, Any]] = []
    offset = 0
    for entry in done:
        losses += [(offset + int(s), float(v)) for s, v in entry.history.train_loss]
        vals += [
            {**h, "step": offset + int(h.get("step", 0)), "stage": entry.name} for h in entry.history.val
        ]
        offset += int(entry.steps)
    return History(train_loss=losses, val=vals)
