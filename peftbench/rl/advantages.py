"""Advantages for policy-gradient fine-tuning of language models.

- Group-relative advantages (GRPO, DeepSeekMath, Shao et al. 2024, arXiv 2402.03300): each prompt gets G
  sampled completions; a completion's advantage is its reward minus its group's mean, divided by the
  group's standard deviation. Dr.GRPO (Liu et al. 2025, arXiv 2503.20783) drops the division, which
  otherwise up-weights prompts whose rewards barely differ.
- RLOO (Ahmadian et al. 2024, arXiv 2402.14740): REINFORCE with, as baseline for sample i, the mean reward
  of the other k - 1 samples of the same prompt; the reward is first penalised by beta times the sampled
  log-ratio to the reference.
- GAE (Schulman et al. 2015, arXiv 1506.02438) over token-level rewards and values, as PPO applied to
  language models uses it (Ziegler et al. 2019, arXiv 1909.08593): the per-token reward is the KL penalty
  plus, on the last token, the sequence reward.

Layout (see `peftbench.rl`): a prompt's G completions are adjacent rows; token tensors are `(batch, T)`
right-padded with a 0/1 `mask`.
"""

from __future__ import annotations

from typing import Literal

import torch

from peftbench.errors import bad_value, is_int

GROUP_SCALES = ("group", "none")
GroupScale = Literal["group", "none"]
GRPO_EPS = 1e-4  # the spec's constant under the standard deviation


def check_group_size(group_size: object, what: str = "group_size") -> int:
    """`group_size` if it is an integer >= 2 (a group of one has no baseline), else a one-line ConfigError."""
    if not is_int(group_size) or group_size < 2:  # type: ignore[operator]
        raise bad_value(what, group_size, "an integer >= 2 (samples per prompt; a group needs a baseline)")
    return group_size  # type: ignore[return-value]


def grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """The flat `(n_prompts * G,)` rewards as `(n_prompts, G)`, one row per prompt."""
    check_group_size(group_size)
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(
            f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size} "
            "(expected a flat tensor of n_prompts * group_size)"
        )
    return rewards.view(-1, group_size)


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: GroupScale = "group", eps: float = GRPO_EPS
) -> torch.Tensor:
    """Per completion: `r_i - mean(group)` divided by `std(group) + eps` (scale "group", GRPO) or not at all
    (scale "none", Dr.GRPO). The standard deviation is the unbiased one (divisor G - 1). A group whose
    rewards are all equal gets advantage exactly 0; each group's advantages sum to 0 (up to rounding)."""
    if scale not in GROUP_SCALES:
        raise bad_value("advantage scale", scale, GROUP_SCALES)
    groups = grouped(rewards.float(), group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def rloo_baseline(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per completion i: the mean reward of the other G - 1 completions of its prompt."""
    groups = grouped(rewards.float(), group_size)
    return ((groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)).reshape(-1)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO's advantage `R_i - mean_{j != i} R_j` (R already KL-penalised: `kl_penalised_rewards`)."""
    return rewards.float() - rloo_baseline(rewards, group_size)


def sequence_log_ratio(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per completion: `sum_t (logp_t - ref_t)` over its tokens, the sampled estimate of KL(policy || ref)."""
    return ((logp - ref_logp) * mask).sum(dim=-1)


def kl_penalised_rewards(
    rewards: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, beta: float
) -> torch.Tensor:
    """RLOO's sequence reward `R_i = r_i - beta * sum_t (logp_t - ref_t)`, without gradient (a reward)."""
    penalty = sequence_log_ratio(logp.detach(), ref_logp.detach(), mask)
    return rewards.float() - beta * penalty


def ppo_token_rewards(
    rewards: torch.Tensor, logp_old: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, beta: float
) -> torch.Tensor:
    """PPO's per-token reward `(batch, T)`: `-beta * (logp_old_t - ref_t)` on every completion token, plus
    the sequence reward on each completion's last token (the last position where `mask` is 1). A
    completion with no token (an all-zero mask row) gets nothing."""
    mask = mask.to(logp_old.dtype)
    token_rewards = -beta * (logp_old.detach() - ref_logp.detach()) * mask
    lengths = mask.sum(dim=-1).long()
    has_tokens = lengths > 0
    rows = torch.arange(mask.shape[0], device=mask.device)[has_tokens]
    last = (lengths - 1)[has_tokens]
    token_rewards[rows, last] += rewards.float().to(token_rewards.device)[has_tokens]
    return token_rewards


def gae(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation, backwards over the completion tokens:
    `delta_t = r_t + gamma * V_{t+1} - V_t`, `A_t = delta_t + gamma * lam * A_{t+1}`, with `V_{T}` and
    `A_{T}` zero past each completion's last token (the episode ends there). `values[:, t]` is the value of
    the state from which token t was sampled. Returns `(advantages, returns)`, `returns = A + V`, both zero
    where `mask` is 0 and without gradient. `mask` must be right-padded (ones then zeros per row)."""
    mask = mask.to(values.dtype)
    rewards, values = token_rewards.detach() * mask, values.detach() * mask
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_advantage) * mask[:, t]
        next_value, next_advantage = values[:, t], advantages[:, t]
    return advantages, (advantages + values) * mask


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over the positions where `mask` is 1 (over all of them, or along `dim`); 0 when none."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim=dim) / mask.sum(dim=dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `x` over the masked positions (Bessel-corrected by default; 0 for fewer than 2)."""
    mean = masked_mean(x, mask)
    count = mask.to(x.dtype).sum()
    sum_sq = (((x - mean) ** 2) * mask.to(x.dtype)).sum()
    divisor = count - 1 if unbiased else count
    if divisor <= 0:
        return torch.zeros((), dtype=x.dtype, device=x.device)
    return sum_sq / divisor


def whiten(
    x: torch.Tensor, mask: torch.Tensor | None = None, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """`(x - mean) / sqrt(var + eps)` over the masked positions (all of them when `mask` is None); with
    `shift_mean=False` the mean is added back (only the scale changes). Masked-out positions come back 0."""
    if mask is None:
        mask = torch.ones_like(x)
    if mask.sum() < 2:
        raise ValueError(f"cannot whiten fewer than 2 values (got {int(mask.sum())})")
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)
