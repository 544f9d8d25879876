"""A mixture of tasks: one adapter trained on the union of several tasks' training sets, each task scored on
its own validation and test splits with its own metrics.

The merging study's upper reference (docs/METHODS.md, "Merging several adapters"; the multi-task baseline of
task arithmetic, arXiv 2212.04089 Sec. 4, and TIES, arXiv 2306.01708 Sec. 5): instead of merging single-task
adapters, train one adapter on all the tasks' data.

`tasks` maps each task's name (a file of ``conf/task``) to overrides of that file (null: none), e.g.
``{classification: {split: {max_train: 200}}, topic_classification: null, summarization: null}``. Each
task builds, splits and tokenizes its own data (`setup`) and keeps its own collator, objective and metrics:

- training: every task's training examples, cut into batches of ONE task each (a task's examples are
  shuffled once from the seed, then cut); the batches of all tasks are shuffled together every epoch by the
  run's resumable sampler, so each optimizer step sees one task and the tasks are mixed in proportion to
  their training sets' sizes. The loss of a batch is its task's loss.
- evaluation: each task's own split in its own fixed order and eval batch size, one task after another;
  ``<task>/<metric>`` for every task metric (its `aggregate` over its examples), and the primary metric
  ``score``: the mean of the tasks' RAW primary metrics (accuracy x 100, ROUGE-L x 100, ...), over the tasks
  present in the pass. The merging study normalises per task itself.

Tasks that add their own head (a classifier on an encoder) are refused: one model answers every task.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch.utils.data import DataLoader

from peftbench.errors import ConfigError

#: batch key naming the task (its index in `tasks`) a batch belongs to
TASK_KEY = "mixture_task"


class TaskBatches:
    """Collate for a loader over whole batches: each item is ``(task index, examples)``; the task's own
    collate builds the batch, tagged with `TASK_KEY`."""

    def __init__(self, collates: Sequence[Callable[[Sequence[Any]], dict[str, Any]]]) -> None:
        self.collates = list(collates)

    def __call__(self, items: Sequence[tuple[int, list[Any]]]) -> dict[str, Any]:
        (index, examples), *rest = items
        if rest:
            raise RuntimeError("a mixture loader serves one batch per item (batch_size=1)")
        batch = self.collates[index](examples)
        batch[TASK_KEY] = index
        return batch


def _cut(data: Sequence[Any], size: int, order: Sequence[int] | None = None) -> list[list[Any]]:
    order = range(len(data)) if order is None else order
    picked = [data[i] for i in order]
    return [picked[i : i + size] for i in range(0, len(picked), size)]


@dataclass(kw_only=True, eq=False)
class MixtureTask:
    """The union of `tasks` (see the module doc). `eval_batch_size`, when set, replaces every task's own."""

    primary_metric: ClassVar[str] = "score"

    tasks: Mapping[str, Mapping[str, Any] | None]
    name: str = "mixture"
    eval_batch_size: int | None = None

    def __post_init__(self) -> None:
        from peftbench.validation import task_config

        if not isinstance(self.tasks, Mapping) or not self.tasks:
            raise ConfigError(
                f"task.tasks={self.tasks!r} is not valid; accepted: a mapping of task names (conf/task) to "
                "overrides or null"
            )
        self.parts = []
        for name, overrides in self.tasks.items():
            config = sub_task_config(str(name), overrides)
            if self.eval_batch_size is not None:
                config["eval_batch_size"] = self.eval_batch_size
            from peftbench.tasks import build_task

            self.parts.append(build_task(task_config(config)))
        self._seed = 0

    # ---- data -----------------------------------------------------------------------------------------
    def setup(self, tokenizer: Any, seed: int) -> None:
        for part in self.parts:
            part.setup(tokenizer, seed)
        self._seed = seed

    def split_sizes(self) -> dict[str, int]:
        sizes = [part.split_sizes() for part in self.parts]
        return {split: sum(s[split] for s in sizes) for split in ("train", "val", "test")}

    def part_sizes(self) -> dict[str, dict[str, int]]:
        """Each task's split sizes, by task name."""
        return {part.name: part.split_sizes() for part in self.parts}

    def train_dataloader(self, batch_size: int) -> DataLoader:
        """One-task batches of every task, shuffled together (`seed`) by the loader's sampler."""
        chunks: list[tuple[int, list[Any]]] = []
        collates = []
        for index, part in enumerate(self.parts):
            loader = part.train_dataloader(batch_size)
            data = list(loader.dataset)  # type: ignore[arg-type]
            generator = torch.Generator().manual_seed(self._seed * 1000 + index)
            order = torch.randperm(len(data), generator=generator).tolist()
            chunks += [(index, chunk) for chunk in _cut(data, batch_size, order)]
            collates.append(loader.collate_fn)
        generator = torch.Generator().manual_seed(self._seed)
        return DataLoader(
            chunks, batch_size=1, shuffle=True, generator=generator, collate_fn=TaskBatches(collates)
        )  # type: ignore[arg-type]

    def _eval_loader(self, split: str, batch_size: int) -> DataLoader:
        chunks: list[tuple[int, list[Any]]] = []
        collates = []
        for index, part in enumerate(self.parts):
            loader = part.val_dataloader(batch_size) if split == "val" else part.test_dataloader(batch_size)
            chunks += [
                (index, chunk) for chunk in _cut(list(loader.dataset), loader.batch_size or batch_size)
            ]  # type: ignore[arg-type]
            collates.append(loader.collate_fn)  # marks each task's first batch (loaders.MarkPassStart)
        return DataLoader(chunks, batch_size=1, shuffle=False, collate_fn=TaskBatches(collates))  # type: ignore[arg-type]

    def val_dataloader(self, batch_size: int) -> DataLoader:
        """Every task's validation batches, task after task, each in its fixed order."""
        return self._eval_loader("val", batch_size)

    def test_dataloader(self, batch_size: int) -> DataLoader:
        """Every task's test batches, task after task, each in its fixed order."""
        return self._eval_loader("test", batch_size)

    # ---- model hooks, objective and metrics -----------------------------------------------------------
    def head(self, model: torch.nn.Module) -> torch.nn.Module | None:
        heads = [part.name for part in self.parts if part.head(model) is not None]
        if heads:
            raise ConfigError(
                f"task=mixture: {', '.join(heads)} adds its own head on this model; accepted: tasks answered "
                "by the language model itself (a causal LM: the verbaliser)"
            )
        return None

    def use_reference(self, reference: Any) -> None:
        for part in self.parts:
            part.use_reference(reference)

    def _part(self, batch: Mapping[str, Any]) -> Any:
        return self.parts[int(batch[TASK_KEY])]

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        return self._part(batch).loss(model, batch)

    def evaluate(self, model: torch.nn.Module, batch: dict[str, Any]) -> dict[str, list[Any]]:
        part = self._part(batch)
        return {f"{part.name}/{key}": values for key, values in part.evaluate(model, batch).items()}

    def aggregate(self, outputs: Mapping[str, Sequence[Any]]) -> dict[str, float]:
        """Each task's own `aggregate` over its keys, as ``<task>/<metric>``, and ``score``: the mean of the
        raw primary metrics of the tasks in the pass."""
        metrics: dict[str, float] = {}
        primaries = []
        for part in self.parts:
            prefix = f"{part.name}/"
            own = {k.removeprefix(prefix): v for k, v in outputs.items() if k.startswith(prefix)}
            if not own:
                continue
            found = part.aggregate(own)
            metrics |= {prefix + key: value for key, value in found.items()}
            if part.primary_metric in found:
                primaries.append(found[part.primary_metric])
        if primaries:
            metrics["score"] = float(sum(primaries)) / len(primaries)
        return metrics


def sub_task_config(name: str, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """``conf/task/<name>.yaml`` with `overrides` merged in; ConfigError for an unknown name or mixture."""
    from omegaconf import OmegaConf

    from peftbench.cli_checks import CONF_DIR

    known = sorted(p.stem for p in (CONF_DIR / "task").glob("*.yaml") if p.stem != "mixture")
    if name not in known:
        raise ConfigError(f"task.tasks has {name!r}; accepted: {', '.join(known)}")
    if overrides is not None and not isinstance(overrides, Mapping):
        raise ConfigError(
            f"task.tasks.{name}={overrides!r} is not valid; accepted: null or a mapping of that task's keys"
        )
    config = OmegaConf.merge(OmegaConf.load(CONF_DIR / "task" / f"{name}.yaml"), dict(overrides or {}))
    return OmegaConf.to_container(config, resolve=True)  # type: ignore[return-value]
