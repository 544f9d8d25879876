"""Statistics logged per rollout batch of RL from feedback (plain floats, ready for the logger/record).

Keys (`ROLLOUT_KEYS`):
- `reward_mean`, `reward_std` (population std over all completions of the batch);
- `zero_spread_groups`: the share of prompts whose G rewards are all equal (within `atol`); those groups
  have zero group-relative advantage and give no learning signal (DAPO, arXiv 2503.14476, filters them);
- `completion_length`: mean number of completion tokens (up to and including the first EOS);
- `kl`: KL to the reference per completion (sum over its tokens of the k3 estimate, mean over completions),
  `kl_per_token`: the k3 estimate's mean over all completion tokens; both exactly 0 when policy == reference;
- `clip_fraction`: the share of completion tokens whose clipped surrogate term was active (mean over the
  updates of the batch), given by the caller from `losses.policy_loss`'s statistics;
- `generation_tokens_per_s`: completion tokens sampled per second of generation, when timed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from peftbench.rl.advantages import grouped
from peftbench.rl.losses import k3_kl

ROLLOUT_KEYS = (
    "reward_mean",
    "reward_std",
    "zero_spread_groups",
    "completion_length",
    "kl",
    "kl_per_token",
    "clip_fraction",
    "generation_tokens_per_s",
)


def zero_spread_share(rewards: torch.Tensor, group_size: int, atol: float = 1e-6) -> float:
    """The share of groups whose rewards all lie within `atol` of each other."""
    groups = grouped(rewards.detach().float(), group_size)
    spread = groups.max(dim=1).values - groups.min(dim=1).values
    return float((spread <= atol).float().mean())


def reference_kl(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """`(per completion, per token)` k3 KL to the reference over the masked tokens."""
    mask = mask.to(torch.float32)
    kl = k3_kl(logp.detach().float(), ref_logp.detach().float()) * mask
    return float(kl.sum(dim=-1).mean()), float(kl.sum() / mask.sum().clamp(min=1))


def rollout_stats(
    rewards: torch.Tensor,
    group_size: int,
    mask: torch.Tensor,
    logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    clip_fraction: float | torch.Tensor | None = None,
    generation_seconds: float | None = None,
    atol: float = 1e-6,
) -> dict[str, float]:
    """The batch's statistics (see the module docstring); KL needs `logp` and `ref_logp`, the keys whose
    inputs are not given are left out."""
    rewards = rewards.detach().float()
    stats = {
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std(unbiased=False)),
        "zero_spread_groups": zero_spread_share(rewards, group_size, atol),
        "completion_length": float(mask.float().sum(dim=-1).mean()),
    }
    if logp is not None and ref_logp is not None:
        stats["kl"], stats["kl_per_token"] = reference_kl(logp, ref_logp, mask)
    if clip_fraction is not None:
        stats["clip_fraction"] = float(clip_fraction)
    if generation_seconds is not None and generation_seconds > 0:
        stats["generation_tokens_per_s"] = float(mask.float().sum()) / generation_seconds
    return stats


def mean_stats(updates: Iterable[Mapping[str, float | torch.Tensor]]) -> dict[str, float]:
    """Key-wise mean of the statistics of several updates (PPO's epochs x minibatches of one batch)."""
    totals: dict[str, float] = {}
    counts: dict[str, int] = {}
    for update in updates:
        for key, value in update.items():
            totals[key] = totals.get(key, 0.0) + float(value)
            counts[key] = counts.get(key, 0) + 1
    return {key: totals[key] / counts[key] for key in totals}
