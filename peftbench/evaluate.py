"""Evaluate: score any run, merged model or merged LoRA on any task's test (or validation) split.

    python -m peftbench.evaluate <run dir | adapter dir | model dir> task=<name> [split=test|val]
        [seed=N] [task.KEY=VALUE ...] [--model KEY=VALUE ...] [--out FILE]

The model: a run (or adapter) directory is rebuilt from its own `model` config with its adapter loaded
(`peftbench.saved_run`; a rank-R or ``cat`` LoRA written by `peftbench.merge` is one too); a directory with a
``config.json`` is a plain transformers model (`peftbench.merge`'s dense output, or any saved model), loaded
in the dtype its ``peftbench_merge.json`` records. The task: ``conf/task/<name>.yaml``, or, when the run
itself trained on that task, the task config its record holds (the same splits, lengths and prompt), then
the ``task.KEY=VALUE`` overrides. Scoring goes through the training module's own test pass (`PeftModule`:
`Task.evaluate` per batch, `Task.aggregate` over the pass), so a run scored here on its own task and seed
gives its recorded ``test/*`` metrics. The metrics are printed and, with ``--out``, written as JSON.
Bad input is one line on stderr, exit code 2.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from peftbench.errors import ConfigError, bad_value, check_int

SPLITS = ("test", "val")
MODEL_FILE = "config.json"


def load_any(path: str | Path, overrides: Sequence[str] = ()) -> tuple[Any, Any, Any]:
    """`(model, tokenizer, method)`: a plain model directory (method None) or a run / adapter directory."""
    from peftbench.merged_output import PROVENANCE
    from peftbench.models import load_model
    from peftbench.saved_run import apply_overrides, load_adapted, locate

    path = Path(path).expanduser()
    if (path / MODEL_FILE).is_file():
        config: dict[str, Any] = {}
        if (path / PROVENANCE).is_file():
            recorded = json.loads((path / PROVENANCE).read_text()).get("model_config") or {}
            config = {k: recorded[k] for k in ("dtype", "architecture", "num_labels") if k in recorded}
        model, tokenizer = load_model(
            apply_overrides({**config, "name_or_path": str(path.resolve())}, overrides)
        )
        return model.eval(), tokenizer, None
    return load_adapted(locate(path, overrides))


def recorded_run(path: str | Path) -> dict[str, Any]:
    """The resolved config a run's ``record.json`` holds ({} for a model or a bare adapter directory)."""
    from peftbench.record import RECORD_FILE

    path = Path(path).expanduser()
    for run_dir in (path, path.parent):
        record = run_dir / RECORD_FILE
        if record.is_file() and (run_dir / "adapter").is_dir():
            try:
                return json.loads(record.read_text()).get("config") or {}
            except json.JSONDecodeError:
                return {}
    return {}


def task_config(name: str, overrides: Sequence[str], recorded: dict[str, Any]) -> dict[str, Any]:
    """The run's own task config when it trained on `name`, else ``conf/task/<name>.yaml``; then
    `overrides` (``KEY=VALUE`` of the task config)."""
    from omegaconf import OmegaConf

    from peftbench.saved_run import apply_overrides
    from peftbench.validation import load_config

    own = recorded.get("task")
    if isinstance(own, dict) and own.get("name") == name:
        base = dict(own)
    else:
        base = OmegaConf.to_container(load_config([f"task={name}"]).task, resolve=True)  # type: ignore[assignment]
    return apply_overrides(base, overrides, "task")


def no_reference() -> contextlib.AbstractContextManager[Any]:
    raise ConfigError(
        "this task scores against the untuned model, which a plain model directory does not carry; "
        "accepted: a run directory"
    )


def score(
    model: Any, task: Any, split: str = "test", batch_size: int = 4, precision: str = "32-true"
) -> dict[str, float]:
    """The metrics of `model` on `task`'s `split` (the task already set up), through `PeftModule`'s test
    pass at `precision` (the run's trainer precision); keys ``<split>/<metric>``. A progress bar."""
    import lightning as L

    from peftbench.module import PeftModule
    from peftbench.progress import build_callbacks
    from peftbench.tasks.sampler import own_generator

    if split not in SPLITS:
        raise bad_value("split", split, SPLITS)
    loader = task.test_dataloader(batch_size) if split == "test" else task.val_dataloader(batch_size)
    module = PeftModule(model, None, task, None)  # type: ignore[arg-type]  # test pass only: no method, no optim
    trainer = L.Trainer(
        accelerator="auto",
        devices=1,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=build_callbacks(),
    )
    with _quiet_lightning():
        found = trainer.test(module, dataloaders=own_generator(loader), verbose=False)[0]
    return {f"{split}/{key.removeprefix('test/')}": float(value) for key, value in found.items()}


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    import logging

    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def evaluate(
    path: str | Path,
    task_name: str,
    split: str = "test",
    seed: int | None = None,
    task_overrides: Sequence[str] = (),
    model_overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Load the model at `path`, set up the task and score it; returns the JSON written by the command."""
    from peftbench.build import seed_everything
    from peftbench.tasks import build_task
    from peftbench.validation import task_config as strip_batching

    if split not in SPLITS:
        raise bad_value("split", split, SPLITS)
    recorded = recorded_run(path)
    config = task_config(task_name, task_overrides, recorded)
    task = build_task(strip_batching(config))  # checked before the model is loaded
    seed = int(recorded.get("seed", 0)) if seed is None else seed
    check_int("seed", seed, minimum=0)
    model, tokenizer, method = load_any(path, model_overrides)
    seed_everything(seed)
    task.setup(tokenizer, seed)
    task.head(model)
    task.use_reference(no_reference if method is None else (lambda: method.disabled(model)))
    precision = str((recorded.get("trainer") or {}).get("precision", "32-true"))
    metrics = score(model, task, split, int(recorded.get("batch_size", 4)), precision)
    return {
        "model": str(Path(path).resolve()),
        "task": task_name,
        "split": split,
        "seed": seed,
        "primary_metric": f"{split}/{task.primary_metric}",
        "metrics": metrics,
        "examples": task.split_sizes()[split],
        "task_config": config,
    }


def parse_args(argv: list[str] | None = None) -> Any:
    from peftbench.commands import OneLineParser, add_model_overrides

    parser = OneLineParser(prog="python -m peftbench.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="a run, adapter or model directory")
    parser.add_argument("overrides", nargs="*", help="task=<name> [split=test|val] [seed=N] [task.KEY=VALUE]")
    add_model_overrides(parser)
    parser.add_argument("--out", type=Path, default=None, help="write the metrics as JSON here")
    return parser.parse_args(argv)


def split_overrides(overrides: Sequence[str]) -> tuple[str, str, int | None, list[str]]:
    """`(task name, split, seed, task.KEY=VALUE overrides)` from the command line's ``KEY=VALUE`` words."""
    name, split, seed, task = None, "test", None, []
    for word in overrides:
        key, sep, value = word.partition("=")
        if not sep:
            raise bad_value("override", word, "KEY=VALUE (task=, split=, seed=, task.KEY=)")
        if key == "task":
            name = value
        elif key == "split":
            split = value
        elif key == "seed":
            if not value.isdigit():
                raise bad_value("seed", value, "an integer >= 0")
            seed = int(value)
        elif key.startswith("task."):
            task.append(f"{key.removeprefix('task.')}={value}")
        else:
            raise bad_value("override", word, "task=<name>, split=test|val, seed=N, task.KEY=VALUE")
    if not name:
        raise ConfigError("task=<name> is missing; accepted: a task of conf/task (e.g. task=classification)")
    if split not in SPLITS:
        raise bad_value("split", split, SPLITS)
    return name, split, seed, task


def main(argv: list[str] | None = None) -> int:
    from peftbench.commands import fail
    from peftbench.files import atomic_write_json

    args = parse_args(argv)
    try:
        name, split, seed, task_overrides = split_overrides(args.overrides)
        result = evaluate(args.path, name, split, seed, task_overrides, args.model_overrides)
    except ConfigError as err:
        return fail(err)
    if args.out is not None:
        atomic_write_json(args.out, result)
    print(json.dumps({"primary_metric": result["primary_metric"], **result["metrics"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
