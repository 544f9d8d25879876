"""Direct Preference Optimization: the loss (Rafailov et al. 2023, arXiv 2305.18290, Eq. 7).

    L = -log sigmoid(beta * ((lp_w - ref_w) - (lp_l - ref_l)))

`lp_w`, `lp_l` are the policy's log-probabilities of the chosen (w) and rejected (l) responses given the
prompt, SUMMED over the response tokens (not averaged); `ref_w`, `ref_l` the same under the frozen reference
model. The implicit reward of a response is `beta * (lp - ref)` (Sec. 5); a pair is ranked correctly when the
chosen response's reward exceeds the rejected one's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class DPOOutput:
    """Per-pair results of `dpo_loss` (all `(pairs,)` tensors except `loss`)."""

    loss: torch.Tensor  # scalar: the mean of `losses`
    losses: torch.Tensor  # -log sigmoid(beta * margin_logits)
    chosen_rewards: torch.Tensor  # beta * (lp_w - ref_w)
    rejected_rewards: torch.Tensor  # beta * (lp_l - ref_l)

    @property
    def margins(self) -> torch.Tensor:
        """Reward margin per pair: chosen reward minus rejected reward."""
        return self.chosen_rewards - self.rejected_rewards


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float = 0.1,
) -> DPOOutput:
    """The DPO loss from summed response log-probs (each `(pairs,)`); the reference terms carry no gradient.

    `-log sigmoid(x)` is computed as `softplus(-x)`, which is exact and stable for large |x|.
    """
    reference_chosen, reference_rejected = reference_chosen.detach(), reference_rejected.detach()
    chosen_rewards = beta * (policy_chosen - reference_chosen)
    rejected_rewards = beta * (policy_rejected - reference_rejected)
    losses = F.softplus(-(chosen_rewards - rejected_rewards))
    return DPOOutput(losses.mean(), losses, chosen_rewards.detach(), rejected_rewards.detach())
