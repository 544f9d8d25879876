"""The benchmark's batches: seeded random token ids, the last `bench.label_fraction` of every row labelled
(`make_batch`), or with `bench.min_seq_len` a cycle of right-padded batches of random row lengths ordered by
the run's training sampler (`make_batches`); the widest batch of a cycle (`widest`) and the batch
description the JSON records (`batch_info`)."""

from __future__ import annotations

from typing import Any

import torch

from peftbench.bench.peft_side import Batch
from peftbench.bench.settings import Settings


def make_batch(vocab_size: int, settings: Settings) -> Batch:
    """Seeded random tokens; the last `label_fraction` of each row is labelled, the rest -100."""
    generator = torch.Generator().manual_seed(settings.seed)
    shape = (settings.batch_size, settings.seq_len)
    input_ids = torch.randint(0, vocab_size, shape, generator=generator)
    labels = input_ids.clone()
    n_labels = max(1, round(settings.label_fraction * settings.seq_len))
    labels[:, : settings.seq_len - n_labels] = -100
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    return {k: v.to(settings.device) for k, v in batch.items()}


def make_batches(vocab_size: int, settings: Settings) -> list[Batch]:
    """The batches a side cycles through: `[make_batch(...)]` (every row `seq_len` long, no padding), or with
    `bench.min_seq_len` a cycle of `timed_steps` batches over `timed_steps * batch_size` seeded random rows of
    lengths uniform in `[min_seq_len, seq_len]`, ordered by the run's training sampler (shuffled, or
    length-grouped with `bench.group_by_length`) and right-padded by the run's collator; the last
    `label_fraction` of each row is labelled."""
    if settings.min_seq_len is None:
        return [make_batch(vocab_size, settings)]
    from peftbench.tasks.collate import CausalLMCollator, Encoded
    from peftbench.tasks.sampler import ResumableSampler

    generator = torch.Generator().manual_seed(settings.seed)
    pool = settings.batch_size * settings.timed_steps
    lengths = torch.randint(settings.min_seq_len, settings.seq_len + 1, (pool,), generator=generator)
    rows = []
    for length in lengths.tolist():
        ids = torch.randint(0, vocab_size, (length,), generator=generator).tolist()
        n_labels = max(1, round(settings.label_fraction * length))
        rows.append(Encoded(ids[: length - n_labels], ids[length - n_labels :], ""))
    sampler = ResumableSampler(pool, seed=settings.seed)
    if settings.group_by_length:
        sampler.group_by_length(lengths.tolist(), settings.batch_size)
    order = list(sampler)
    collate = CausalLMCollator(pad_id=0)
    batches = []
    for start in range(0, pool, settings.batch_size):
        batch = collate([rows[i] for i in order[start : start + settings.batch_size]])
        batches.append({k: batch[k].to(settings.device) for k in ("input_ids", "attention_mask", "labels")})
    return batches


def widest(batches: list[Batch]) -> Batch:
    """The batch with the most positions (the first of those): the measured step's, for the memory split."""
    return max(batches, key=lambda b: b["input_ids"].numel())


def batch_info(batches: Batch | list[Batch], settings: Settings | None = None) -> dict[str, Any]:
    """Shape of the widest batch, real tokens, labelled tokens and the padding fraction over the cycle."""
    batches = [batches] if isinstance(batches, dict) else batches
    mask = [b["attention_mask"] for b in batches]
    positions = sum(m.numel() for m in mask)
    tokens = sum(int(m.sum()) for m in mask)
    info: dict[str, Any] = {
        "shape": list(widest(batches)["labels"].shape),
        "batches": len(batches),
        "widths": [int(b["input_ids"].shape[1]) for b in batches],
        "tokens": tokens,
        "positions": positions,
        "labelled_tokens": sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches),
        "padding_fraction": 1 - tokens / positions,
        "source": "random token ids from torch.Generator().manual_seed(seed)",
    }
    if settings is not None and settings.min_seq_len is not None:
        info["lengths"] = f"uniform in [{settings.min_seq_len}, {settings.seq_len}]"
        info["group_by_length"] = settings.group_by_length
    return info
