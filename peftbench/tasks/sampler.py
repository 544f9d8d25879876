"""A training sampler that makes a run resumable mid-epoch, shards it across processes, and can group
examples of similar length into the same batch (`task.group_by_length`).

The order of epoch `e` depends only on `(seed, e)` (and, when grouping, on the global batch size), not on
how many epochs this process has iterated, so a resumed run sees the same order; `resume_at(epoch, skip)`
makes the next pass over that epoch start after the `skip` examples this rank had already consumed. Under
DDP each rank takes every `world_size`-th index of the (padded) global order, as
`torch.utils.data.DistributedSampler` does: the union of the ranks' k-th batches of size B is the
single-process k-th batch of size `world_size * B`, i.e. positions `[k W B, (k + 1) W B)` of the global
order.

Length grouping (`group_by_length(loader)`) keeps that property and only changes the global order: the
shuffled permutation is cut into mega-batches of `MEGABATCH_BATCHES` global batches, each is sorted by
length (longest first, ties in shuffled order), cut into global batches of `W B` consecutive examples,
and the order of those batches is shuffled (the last, partial one stays last). Every global batch, and so
every rank's share of it, holds examples of similar length: less padding, the same examples once per
epoch. (The same scheme as HF transformers' `LengthGroupedSampler`, here deterministic per seed and epoch,
and aware of the ranks.)

`len()` is the full per-rank epoch length even while skipping: Lightning counts the batches it restored
from the checkpoint plus the ones still to come.

The training loader's resumable state lives here too: `resumable_train_loader` rebuilds a task's loader
around a `ResumableSampler`, `loader_state` is what a checkpoint keeps of the data position and
`restore_loader_state` hands it back to the sampler (peftbench/checkpointing.py calls both).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

from peftbench.errors import ConfigError

log = logging.getLogger(__name__)
_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: (seed, epoch) pairs map to distinct generator seeds
#: global batches per mega-batch when grouping by length: bigger groups closer lengths, smaller keeps the
#: batches' composition more random from epoch to epoch (HF transformers uses 50)
MEGABATCH_BATCHES = 50


def replicas() -> tuple[int, int]:
    """`(world_size, rank)` of the initialised process group, `(1, 0)` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def grouped_order(
    order: Sequence[int], lengths: Sequence[int], group: int, generator: torch.Generator | None
) -> list[int]:
    """`order` rearranged so that each run of `group` consecutive indices has similar `lengths`.

    Mega-batches of `MEGABATCH_BATCHES * group` indices are sorted by length, longest first (stable: ties
    keep their order in `order`), and cut into groups; the full groups are shuffled by `generator` (kept in
    place without one), the partial group (`len(order) % group` indices) stays last. A permutation of
    `order`.
    """
    mega = max(1, group * MEGABATCH_BATCHES)
    ranked: list[int] = []
    for start in range(0, len(order), mega):
        ranked += sorted(order[start : start + mega], key=lambda i: -lengths[i])
    full = len(ranked) // group
    groups = [ranked[g * group : (g + 1) * group] for g in range(full)]
    if generator is not None and full > 1:
        groups = [groups[g] for g in torch.randperm(full, generator=generator).tolist()]
    return [i for g in groups for i in g] + ranked[full * group :]


class ResumableSampler(Sampler[int]):
    """Indices `0..num_examples-1`, shuffled per epoch from `(seed, epoch)` (or in order), this rank's share;
    length-grouped once `group_by_length` gave it the examples' lengths and the per-rank batch size.

    The rank and world size are read when iterated (the process group starts inside `trainer.fit`, after
    the loader is built), so one sampler serves single-process and DDP runs.
    """

    def __init__(self, num_examples: int, seed: int = 0, shuffle: bool = True) -> None:
        self.num_examples = int(num_examples)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epoch = 0
        self.lengths: list[int] | None = None  # per example, when grouping by length
        self.batch_size = 1  # per rank, when grouping by length
        self._resume: tuple[int, int] | None = None  # (epoch, examples of this rank to skip)

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        self.epoch = int(epoch)

    def resume_at(self, epoch: int, skip: int) -> None:
        """The next pass over `epoch` starts after this rank's first `skip` examples (once)."""
        self._resume = (int(epoch), int(skip))

    def group_by_length(self, lengths: Sequence[int], batch_size: int) -> None:
        """From now on, batches of `batch_size` (per rank) hold examples of similar `lengths`."""
        if len(lengths) != self.num_examples:
            raise ValueError(f"{len(lengths)} lengths for {self.num_examples} examples")
        self.lengths = [int(n) for n in lengths]
        self.batch_size = int(batch_size)

    def order(self, epoch: int, world: int = 1) -> list[int]:
        """The global order of `epoch` (before sharding over `world` processes)."""
        generator = None
        if self.shuffle:
            generator = torch.Generator().manual_seed((self.seed * _MIX + epoch) % 2**63)
            indices = torch.randperm(self.num_examples, generator=generator).tolist()
        else:
            indices = list(range(self.num_examples))
        if self.lengths is None:
            return indices
        return grouped_order(indices, self.lengths, self.batch_size * world, generator)

    def __len__(self) -> int:
        world, _ = replicas()
        return math.ceil(self.num_examples / world)

    def __iter__(self) -> Iterator[int]:
        world, rank = replicas()
        indices = self.order(self.epoch, world)
        total = math.ceil(self.num_examples / world) * world
        if indices and total > len(indices):  # pad (repeating the start) so every rank gets as many
            indices = (indices * math.ceil(total / len(indices)))[:total]
        mine = indices[rank:total:world]
        skip = 0
        if self._resume is not None and self._resume[0] <= self.epoch:
            if self._resume[0] == self.epoch:
                skip = self._resume[1]
            self._resume = None
        yield from mine[skip:]


def example_lengths(dataset: Sequence[Any], collate: Callable[[list[Any]], dict[str, Any]]) -> list[int]:
    """Each example's padded width alone: the last dimension of `collate([example])["attention_mask"]`
    (for any task: a preference pair counts as its longer row)."""
    return [int(collate([example])["attention_mask"].shape[-1]) for example in dataset]


def group_by_length(loader: DataLoader) -> DataLoader:
    """Make the training `loader` (built around a `ResumableSampler`) length-grouped, in place."""
    sampler = loader.sampler
    if not isinstance(sampler, ResumableSampler) or loader.batch_size is None:
        raise ConfigError(
            f"task.group_by_length=true needs the task's plain training loader (got a "
            f"{type(sampler).__name__}); accepted: task.group_by_length=false for this task"
        )
    sampler.group_by_length(example_lengths(loader.dataset, loader.collate_fn), loader.batch_size)  # type: ignore[arg-type]
    return loader


# ----- the training loader's resumable state --------------------------------------------------------------
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


def loader_state(trainer: Any) -> dict[str, int]:
    """The training data position a checkpoint keeps: the epoch and the batches of it already drawn."""
    return {
        "epoch": int(trainer.current_epoch),
        "batches": int(trainer.fit_loop.epoch_loop.batch_progress.current.ready),
    }


def restore_loader_state(loader: DataLoader, state: dict[str, int] | None) -> None:
    """Make the next pass over the saved epoch start after the batches drawn before (a `ResumableSampler`
    only; another loader resumes at the start of its epoch)."""
    sampler = getattr(loader, "sampler", None)
    if state and isinstance(sampler, ResumableSampler):
        sampler.resume_at(state["epoch"], state["batches"] * int(loader.batch_size or 1))
