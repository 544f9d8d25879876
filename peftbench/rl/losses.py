"""Token log-probs of sampled completions and the policy-gradient losses built on them.

- Clipped surrogate (PPO, Schulman et al. 2017, arXiv 1707.06347): per token, with `rho = exp(logp -
  logp_old)`, the loss `-min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A)`. GRPO (arXiv 2402.03300)
  uses it with a sequence-level advantage; DAPO's "clip-higher" (Yu et al. 2025, arXiv 2503.14476) is
  `eps_high > eps_low`.
- KL to the reference, per token, by the "k3" estimator of J. Schulman's note "Approximating KL
  Divergence" (2020): `exp(ref - logp) - (ref - logp) - 1`, unbiased for KL(policy || ref) on samples of
  the policy, never negative, exactly 0 where the two log-probs are equal.
- Aggregation of per-token losses (`AGGREGATIONS`): `sequence_mean` (GRPO: mean over each completion's
  tokens, then over completions), `token_mean` (DAPO: one mean over every token of the batch), `constant`
  (Dr.GRPO, arXiv 2503.20783: the token sum divided by a constant, completions x the generation budget,
  so neither length nor batch composition rescales a token's gradient), `sequence_sum` (RLOO, arXiv
  2402.14740: sum over each completion's tokens, mean over completions).
- Clipped value loss for PPO's value head, as in PPO applied to language models (arXiv 1909.08593).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from peftbench.errors import bad_value
from peftbench.rl.advantages import GroupScale, masked_mean
from peftbench.tasks.objectives import _decoder_and_head

AGGREGATIONS = ("sequence_mean", "token_mean", "constant", "sequence_sum")
Aggregation = Literal["sequence_mean", "token_mean", "constant", "sequence_sum"]

# A GRPO flavour is an advantage scale (advantages.group_advantages) and a loss aggregation.
GRPO_VARIANTS: dict[str, tuple[GroupScale, Aggregation]] = {
    "grpo": ("group", "sequence_mean"),
    "dr_grpo": ("none", "constant"),
    "dapo": ("group", "token_mean"),
}


def grpo_variant(name: str) -> tuple[GroupScale, Aggregation]:
    """`(advantage scale, aggregation)` of a GRPO flavour; a one-line ConfigError for an unknown name."""
    if name not in GRPO_VARIANTS:
        raise bad_value("loss_type", name, GRPO_VARIANTS)
    return GRPO_VARIANTS[name]


# ---- log-probs ------------------------------------------------------------------------------------------
def completion_mask(completion_ids: torch.Tensor, eos_token_id: int | Sequence[int]) -> torch.Tensor:
    """`(batch, T)` 0/1 float mask: a completion's tokens up to and including its first EOS. A completion
    without EOS (cut by the generation budget) keeps all its tokens. Padding only ever follows an EOS."""
    eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device)).long()
    after_first_eos = (is_eos.cumsum(dim=-1) - is_eos) > 0
    return (~after_first_eos).float()


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """`log softmax(logits / temperature)[token]` per position, float32, `(batch, T)`; `logits[:, t]` is the
    distribution token t was sampled from."""
    scaled = logits.float() / temperature
    picked = scaled.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(scaled, dim=-1)


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of `softmax(logits / temperature)` per position, `(batch, T)`, float32."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def completion_logits(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_length: int
) -> torch.Tensor:
    """`(batch, T, vocab)` logits predicting the last `completion_length` tokens of `input_ids` (left-padded
    prompt then completion, as `generate` returns it). Positions follow the attention mask, as generation
    numbers them (rotary models do not depend on a row's constant shift; absolute-position models do). The
    output head runs on those T positions only when the model exposes its decoder and head (as
    `peftbench.tasks.objectives` does)."""
    position_ids = (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
    window = slice(-completion_length - 1, -1)
    parts = _decoder_and_head(model)
    if parts is None:
        return model(**inputs, use_cache=False).logits[:, window]
    decoder, head = parts
    hidden = decoder(**inputs, use_cache=False).last_hidden_state
    return head(hidden[:, window])


def completion_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_length: int,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token log-probs `(batch, T)` of the last `completion_length` tokens of `input_ids` under `model`
    at the sampling temperature (see `completion_logits`). Multiply by `completion_mask` before use."""
    logits = completion_logits(model, input_ids, attention_mask, completion_length)
    return token_logprobs(logits, input_ids[:, -completion_length:], temperature)


# ---- losses ---------------------------------------------------------------------------------------------
def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || reference) on policy samples: `exp(d) - d - 1`, `d = ref - logp`.
    Never negative; 0 where `logp == ref_logp`. Carries the policy's gradient (the reference has none)."""
    d = ref_logp.detach() - logp
    return torch.exp(d) - d - 1


def aggregate(
    per_token: torch.Tensor, mask: torch.Tensor, mode: Aggregation, normaliser: float | None = None
) -> torch.Tensor:
    """Reduce `(batch, T)` per-token losses over the masked tokens to a scalar (see the module docstring).
    `normaliser` overrides the divisor of `token_mean` (the token count of the whole rollout batch when this
    is one minibatch of it) and of `constant` (default `batch x T`; Dr.GRPO: completions x max_new_tokens)."""
    mask = mask.to(per_token.dtype)
    masked = per_token * mask
    if mode == "sequence_mean":
        return (masked.sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)).mean()
    if mode == "sequence_sum":
        return masked.sum(dim=-1).mean()
    if mode == "token_mean":
        return masked.sum() / (normaliser if normaliser is not None else mask.sum().clamp(min=1))
    if mode == "constant":
        return masked.sum() / (normaliser if normaliser is not None else mask.numel())
    raise bad_value("aggregation", mode, AGGREGATIONS)


def clipped_surrogate(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token `-min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A)`; `advantages` is `(batch,)` (one
    per completion, GRPO/RLOO) or `(batch, T)` (per token, PPO). Returns `(loss, ratio, clipped)`, where
    `clipped` marks the tokens whose clipped term is the active one, which get no gradient: `rho > 1 +
    eps_high` with `A > 0`, or `rho < 1 - eps_low` with `A < 0`."""
    eps_high = eps_low if eps_high is None else eps_high
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    advantages = advantages.detach().to(logp.dtype)
    ratio = torch.exp(logp - old_logp.detach())
    unclipped = ratio * advantages
    clipped_term = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * advantages
    clipped = clipped_term < unclipped
    return -torch.minimum(unclipped, clipped_term), ratio, clipped


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float | None = None,
    aggregation: Aggregation = "sequence_mean",
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    normaliser: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's / PPO's policy loss: the clipped surrogate plus `beta * k3_kl(logp, ref_logp)` per token,
    aggregated over the masked tokens. With one update per rollout batch pass `old_logp = logp.detach()`
    (the ratio is then 1 and the gradient is REINFORCE's). Returns the loss and detached statistics:
    `clip_fraction`, `approx_kl` (k3 of the old policy to the current one), `kl_per_token` (k3 to the
    reference, mean per token; only with `ref_logp`)."""
    if beta and ref_logp is None:
        raise ValueError("policy_loss: beta > 0 needs ref_logp")
    per_token, _, clipped = clipped_surrogate(logp, old_logp, advantages, eps_low, eps_high)
    stats: dict[str, torch.Tensor] = {}
    if ref_logp is not None:
        kl = k3_kl(logp, ref_logp)
        if beta:
            per_token = per_token + beta * kl
        stats["kl_per_token"] = masked_mean(kl.detach(), mask)
    loss = aggregate(per_token, mask, aggregation, normaliser)
    with torch.no_grad():
        log_ratio = logp - old_logp
        stats["clip_fraction"] = masked_mean(clipped.to(logp.dtype), mask)
        stats["approx_kl"] = masked_mean(torch.exp(log_ratio) - 1 - log_ratio, mask)
    return loss, stats


def reinforce_loss(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    aggregation: Aggregation = "sequence_sum",
) -> torch.Tensor:
    """REINFORCE: `-A_i * logp_t` per token, aggregated (RLOO's `-A_i * sum_t logp_t`, batch mean, by
    default). `advantages` is `(batch,)` or `(batch, T)`."""
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    return aggregate(-advantages.detach().to(logp.dtype) * logp, mask, aggregation)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped value loss `0.5 * mean_t max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)` over
    the masked tokens (the caller multiplies by the value coefficient, 0.1 by default in the spec).
    Returns the loss and `value_clip_fraction` (tokens where the clipped error is the larger)."""
    old_values, returns = old_values.detach(), returns.detach()
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    plain, clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(plain, clipped), mask)
    with torch.no_grad():
        fraction = masked_mean((clipped > plain).to(values.dtype), mask)
    return loss, {"value_clip_fraction": fraction}


def entropy_stat(logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean per-token entropy of the sampling distribution over the completion tokens (detached)."""
    with torch.no_grad():
        return masked_mean(token_entropy(logits, temperature), mask)
