"""The Bradley-Terry reward-model loss (InstructGPT, arXiv 2203.02155, Sec. 3.5, Eq. 1), with a margin and
an optional reward-centring term (Eisenstein et al., arXiv 2312.09244, Sec. 3).

    L = mean( -log sigmoid(r_chosen - r_rejected - margin) ) + c * mean( (r_chosen + r_rejected)^2 )

(means over the pairs). `r_chosen`, `r_rejected` are the scalar rewards of the two responses of a pair;
`margin` (per pair, 0 unless the data give one) asks the chosen reward to win by at least that much
(Llama 2, arXiv 2307.09288, Sec. 3.2.2); `c` (>= 0, default 0) pulls the rewards of a pair towards a zero
sum, which the Bradley-Terry term alone leaves undetermined (it sees differences only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class BradleyTerryOutput:
    """Per-pair results of `bradley_terry_loss` (all `(pairs,)` tensors except `loss`)."""

    loss: torch.Tensor  # scalar: mean of `losses`, plus the centring term
    losses: torch.Tensor  # -log sigmoid(r_c - r_r - margin), per pair
    chosen_rewards: torch.Tensor  # detached
    rejected_rewards: torch.Tensor  # detached

    @property
    def margins(self) -> torch.Tensor:
        """Reward margin per pair: chosen reward minus rejected reward (the data's margin not subtracted)."""
        return self.chosen_rewards - self.rejected_rewards


def bradley_terry_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    centring: float = 0.0,
) -> BradleyTerryOutput:
    """The loss above from per-pair rewards (each `(pairs,)`); `-log sigmoid(x)` as `softplus(-x)` (exact
    and stable for large |x|)."""
    difference = chosen - rejected
    if margin is not None:
        difference = difference - margin.to(difference)
    losses = F.softplus(-difference)
    loss = losses.mean()
    if centring:
        loss = loss + centring * (chosen + rejected).pow(2).mean()
    return BradleyTerryOutput(loss, losses, chosen.detach(), rejected.detach())
