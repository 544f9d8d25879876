"""The updates made from one scored rollout batch: GRPO (and Dr.GRPO, DAPO), RLOO and PPO.

One function, `update_policy`, serves the three algorithms (docs/METHODS.md, "Reinforcement learning from
feedback"); they differ only in their advantages and in how the loss is aggregated:
- GRPO (arXiv 2402.03300): group-relative advantage per completion (`advantages.group_advantages`), the
  clipped surrogate plus `beta` times the k3 KL to the reference per token, the `loss_type`'s aggregation
  (`losses.GRPO_VARIANTS`; Dr.GRPO divides by completions x `max_new_tokens`);
- RLOO (arXiv 2402.14740): the sequence reward penalised by `beta` times the sampled log-ratio to the
  reference, leave-one-out baseline, `-A_i * sum_t logp_t` (aggregation `sequence_sum`);
- PPO (arXiv 1707.06347 as in arXiv 1909.08593): per-token reward `-beta * (logp_old - ref)` plus the score
  on the last token, GAE over the value head's estimates, whitened advantages, clipped policy loss
  (token mean) plus `value_coef` times the clipped value loss.
Every algorithm takes `epochs` passes of `minibatches` minibatches over the batch, one real optimizer step
each (`step(loss)`); with one of each the old log-probs are the current ones detached (ratio 1: GRPO's
gradient is then REINFORCE's) and the batch costs one forward pass less.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from peftbench.errors import bad_value, is_int, is_number
from peftbench.rl.advantages import (
    check_group_size,
    gae,
    group_advantages,
    kl_penalised_rewards,
    ppo_token_rewards,
    rloo_advantages,
    whiten,
)
from peftbench.rl.losses import Aggregation, grpo_variant, policy_loss, value_loss
from peftbench.rl.policy import policy_logprobs
from peftbench.rl.rollout import Rollout
from peftbench.rl.stats import mean_stats, rollout_stats

ALGORITHMS = ("grpo", "rloo", "ppo")


@dataclass(frozen=True)
class UpdateSettings:
    """The knobs of one algorithm (the task config's keys of the same names; see conf/task/grpo.yaml)."""

    algorithm: str = "grpo"
    loss_type: str = "grpo"  # GRPO only: grpo | dr_grpo | dapo
    group_size: int = 4
    temperature: float = 1.0
    beta: float = 0.04
    epsilon: float = 0.2
    epsilon_high: float | None = None  # DAPO's clip-higher; None: epsilon
    epochs: int = 1
    minibatches: int = 1
    gamma: float = 1.0
    lam: float = 0.95
    value_coef: float = 0.1
    value_clip: float = 0.2
    whiten_advantages: bool = True
    max_new_tokens: int = 16

    def check(self) -> None:
        """One-line ConfigErrors for values no algorithm accepts."""
        if self.algorithm not in ALGORITHMS:
            raise bad_value("task.algorithm", self.algorithm, ALGORITHMS)
        grpo_variant(self.loss_type)
        check_group_size(self.group_size, "task.group_size")  # PPO too: its statistics are per group
        for key in ("epochs", "minibatches"):
            value = getattr(self, key)
            if not is_int(value) or value < 1:
                raise bad_value(f"task.{key}", value, "an integer >= 1")
        for key in ("temperature", "epsilon", "lam", "value_clip"):
            value = getattr(self, key)
            if not is_number(value) or not value > 0:
                raise bad_value(f"task.{key}", value, "a number > 0")
        for key in ("beta", "gamma", "value_coef"):
            value = getattr(self, key)
            if not is_number(value) or value < 0:
                raise bad_value(f"task.{key}", value, "a number >= 0")
        if self.epsilon_high is not None and (not is_number(self.epsilon_high) or self.epsilon_high <= 0):
            raise bad_value("task.epsilon_high", self.epsilon_high, "a number > 0, or null (= epsilon)")

    @property
    def uses_values(self) -> bool:
        return self.algorithm == "ppo"

    @property
    def aggregation(self) -> Aggregation:
        if self.algorithm == "grpo":
            return grpo_variant(self.loss_type)[1]
        return "sequence_sum" if self.algorithm == "rloo" else "token_mean"

    def updates_per_batch(self) -> int:
        return self.epochs * self.minibatches


def _advantages(
    s: UpdateSettings,
    rewards: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    old_values: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(advantages (rows, 1) or (rows, T), returns or None)`, without gradient."""
    if s.algorithm == "grpo":
        scale = grpo_variant(s.loss_type)[0]
        return group_advantages(rewards, s.group_size, scale).unsqueeze(-1), None
    if s.algorithm == "rloo":
        penalised = kl_penalised_rewards(rewards, old_logp, ref_logp, mask, s.beta)
        return rloo_advantages(penalised, s.group_size).unsqueeze(-1), None
    assert old_values is not None
    token_rewards = ppo_token_rewards(rewards, old_logp, ref_logp, mask, s.beta)
    advantages, returns = gae(token_rewards, old_values, mask, s.gamma, s.lam)
    if s.whiten_advantages and mask.sum() >= 2:
        advantages = whiten(advantages, mask)
    return advantages, returns


def minibatch_order(rows: int, minibatches: int, epochs: int, seed: int) -> list[torch.Tensor]:
    """The row indices of every update: per epoch a permutation (seeded from `seed` and the epoch; the rows
    in order when there is one minibatch) cut into `minibatches` near-equal parts."""
    if minibatches > rows:
        raise bad_value("task.minibatches", minibatches, f"at most the rollout rows per batch ({rows})")
    order = []
    for epoch in range(epochs):
        if minibatches == 1:
            perm = torch.arange(rows)
        else:
            perm = torch.randperm(rows, generator=torch.Generator().manual_seed(seed + epoch))
        order += list(torch.tensor_split(perm, minibatches))
    return order


def update_policy(
    model: torch.nn.Module,
    rollout: Rollout,
    rewards: torch.Tensor,
    ref_logp: torch.Tensor,
    settings: UpdateSettings,
    step: Callable[[torch.Tensor], None],
    seed: int = 0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Make the batch's updates (see the module doc), calling `step(loss)` once per update. Returns the
    mean loss (detached) and the batch's statistics (`stats.rollout_stats` keys, of the policy as it sampled,
    plus the updates' mean `approx_kl` and, for PPO, `value_loss`)."""
    s = settings
    device = rollout.sequences.device
    rewards, ref_logp, mask = rewards.to(device).float(), ref_logp.to(device), rollout.mask.to(device)
    single = s.updates_per_batch() == 1
    old_logp = old_values = advantages = returns = None
    if not single:
        with torch.no_grad():
            old_logp, old_values = policy_logprobs(model, rollout, s.temperature, s.uses_values)
        advantages, returns = _advantages(s, rewards, old_logp, ref_logp, mask, old_values)
    beta_in_loss = s.beta if s.algorithm == "grpo" else 0.0
    losses, updates = [], []
    for index in minibatch_order(rollout.sequences.shape[0], s.minibatches, s.epochs, seed):
        part = rollout.rows(index)
        logp, values = policy_logprobs(model, part, s.temperature, s.uses_values)
        if single:  # the policy has not moved since sampling: its log-probs are the old ones
            old_logp = logp.detach()
            old_values = values.detach() if values is not None else None
            advantages, returns = _advantages(s, rewards, old_logp, ref_logp, mask, old_values)
        assert old_logp is not None and advantages is not None
        rows = part.sequences.shape[0]
        normaliser = float(rows * s.max_new_tokens) if s.aggregation == "constant" else None
        loss, stats = policy_loss(
            logp,
            old_logp[index],
            advantages[index],
            part.mask,
            eps_low=s.epsilon,
            eps_high=s.epsilon_high,
            aggregation=s.aggregation,
            ref_logp=ref_logp[index],
            beta=beta_in_loss,
            normaliser=normaliser,
        )
        if s.uses_values:
            assert values is not None and old_values is not None and returns is not None
            v_loss, v_stats = value_loss(values, old_values[index], returns[index], part.mask, s.value_clip)
            loss = loss + s.value_coef * v_loss
            stats = {**stats, **v_stats, "value_loss": v_loss.detach()}
        step(loss)
        losses.append(loss.detach())
        updates.append(stats)
    update_stats = mean_stats(updates)
    assert old_logp is not None
    batch_stats = _batch_stats(s, rewards, mask, old_logp, ref_logp, update_stats, rollout.seconds)
    return torch.stack(losses).mean(), batch_stats


def _batch_stats(
    s: UpdateSettings,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    updates: dict[str, float],
    generation_seconds: float,
) -> dict[str, float]:
    """`rollout_stats` (KL of the policy as it sampled) plus the updates' means (`approx_kl`, PPO's value
    loss)."""
    clip = updates.get("clip_fraction")
    stats = rollout_stats(rewards, s.group_size, mask, logp, ref_logp, clip, generation_seconds)
    for key in ("approx_kl", "value_loss", "value_clip_fraction"):
        if key in updates:
            stats[key] = updates[key]
    return stats
