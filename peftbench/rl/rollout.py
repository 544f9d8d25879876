"""Rollouts: G sampled completions per prompt from the policy, with the KV cache, seeded.

`sample_completions` repeats each left-padded prompt G times (row `p * G + i` is sample i of prompt p, the
layout of `peftbench.rl`), samples with `model.generate` (KV cache on, plain temperature sampling: no top-k,
no top-p, so the log-probs `losses.completion_logprobs` computes at the same temperature are those of the
sampling distribution) and cuts the completions at their first EOS (`losses.completion_mask`).

Sampling is seeded from `(seed, steps_done, rank)` inside `torch.random.fork_rng`: the same optimizer step of
a resumed run draws the same token ids, and the global random state (dropout, data order) is left as it was.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from peftbench.rl.losses import completion_mask

#: multipliers that mix (seed, step, rank) into one generator seed (distinct primes, no collisions in range)
_SEED_MIX = (1_000_003, 10_007)


@dataclass
class Rollout:
    """A batch of sampled completions, rows `p * G + i`.

    Attributes:
        sequences: `(rows, prompt_len + T)` left-padded prompt then completion token ids.
        attention_mask: `(rows, prompt_len + T)`: the prompt's mask, then ones over the completion.
        completion_ids: `(rows, T)` the sampled tokens (padding after an EOS).
        mask: `(rows, T)` float, 1 up to and including the first EOS (`losses.completion_mask`).
        group_size: G.
        seconds: wall time of `generate`.
    """

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    completion_ids: torch.Tensor
    mask: torch.Tensor
    group_size: int
    seconds: float

    @property
    def length(self) -> int:
        """T, the completion width (the longest completion of the batch)."""
        return int(self.completion_ids.shape[1])

    def rows(self, index: torch.Tensor | slice) -> Rollout:
        """The rows `index` (a PPO minibatch); `group_size` is kept as information only."""
        return Rollout(
            self.sequences[index],
            self.attention_mask[index],
            self.completion_ids[index],
            self.mask[index],
            self.group_size,
            self.seconds,
        )


def sampling_seed(seed: int, steps_done: int, rank: int = 0) -> int:
    """The generator seed of the rollout taken after `steps_done` optimizer steps on `rank`."""
    return (int(seed) * _SEED_MIX[0] + int(steps_done) * _SEED_MIX[1] + int(rank)) % (2**63 - 1)


@torch.no_grad()
def sample_completions(
    model: Any,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    group_size: int,
    max_new_tokens: int,
    temperature: float,
    eos_token_id: int,
    pad_token_id: int,
    seed: int,
) -> Rollout:
    """Sample `group_size` completions of every left-padded prompt (see the module doc). The model is run in
    eval mode (no dropout) and put back in the mode it was in."""
    ids = prompt_ids.repeat_interleave(group_size, dim=0)
    att = prompt_mask.repeat_interleave(group_size, dim=0)
    was_training = model.training
    model.eval()
    devices = [ids.device] if ids.device.type == "cuda" else []
    started = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            output = model.generate(
                input_ids=ids,
                attention_mask=att,
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos_token_id,
                pad_token_id=pad_token_id,
                use_cache=True,
            )
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - started
    completion = output[:, ids.shape[1] :]
    full_mask = torch.cat([att, torch.ones_like(completion, dtype=att.dtype)], dim=1)
    return Rollout(
        sequences=output,
        attention_mask=full_mask,
        completion_ids=completion,
        mask=completion_mask(completion, eos_token_id),
        group_size=group_size,
        seconds=seconds,
    )
