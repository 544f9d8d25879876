"""A training sampler that makes a run resumable mid-epoch and shards it across processes.

The order of epoch `e` depends only on `(seed, e)` (not on how many epochs this process has iterated), so a
resumed run sees the same order; `resume_at(epoch, skip)` makes the next pass over that epoch start after
the `skip` examples this rank had already consumed. Under DDP each rank takes every `world_size`-th index
of the (padded) permutation, as `torch.utils.data.DistributedSampler` does: the union of the ranks' k-th
batches of size B is the single-process k-th batch of size `world_size * B`.

`len()` is the full per-rank epoch length even while skipping: Lightning counts the batches it restored
from the checkpoint plus the ones still to come.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: (seed, epoch) pairs map to distinct generator seeds


def replicas() -> tuple[int, int]:
    """`(world_size, rank)` of the initialised process group, `(1, 0)` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class ResumableSampler(Sampler[int]):
    """Indices `0..num_examples-1`, shuffled per epoch from `(seed, epoch)` (or in order), this rank's share.

    The rank and world size are read when iterated (the process group starts inside `trainer.fit`, after
    the loader is built), so one sampler serves single-process and DDP runs.
    """

    def __init__(self, num_examples: int, seed: int = 0, shuffle: bool = True) -> None:
        self.num_examples = int(num_examples)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, examples of this rank to skip)

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        self.epoch = int(epoch)

    def resume_at(self, epoch: int, skip: int) -> None:
        """The next pass over `epoch` starts after this rank's first `skip` examples (once)."""
        self._resume = (int(epoch), int(skip))

    def order(self, epoch: int) -> list[int]:
        """The global order of `epoch` (before sharding)."""
        if not self.shuffle:
            return list(range(self.num_examples))
        generator = torch.Generator().manual_seed((self.seed * _MIX + epoch) % 2**63)
        return torch.randperm(self.num_examples, generator=generator).tolist()

    def __len__(self) -> int:
        world, _ = replicas()
        return math.ceil(self.num_examples / world)

    def __iter__(self) -> Iterator[int]:
        world, rank = replicas()
        indices = self.order(self.epoch)
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
