"""The policy's view of a rollout: per-token log-probs of the sampled completion tokens and, for PPO, the
value head's estimate at the same positions, from one forward pass.

Positions follow the attention mask as generation numbers them (as `losses.completion_logits`); position
`t` of the completion window is the hidden state from which completion token `t` was sampled, which is also
the state whose value `V_t` GAE needs (`advantages.gae`). The value head (PPO's critic, Ziegler et al. 2019,
arXiv 1909.08593, sharing the policy's trunk) is a linear map of the final hidden state to a scalar.
"""

from __future__ import annotations

import torch
from torch import nn

from peftbench.rl.losses import completion_logprobs, token_logprobs
from peftbench.rl.rollout import Rollout
from peftbench.tasks.objectives import _decoder_and_head

#: the attribute the value head is attached under (a task head: trained beside the method, saved with it)
VALUE_HEAD = "rl_value_head"


def new_value_head(hidden_size: int) -> nn.Linear:
    """A float32 `Linear(hidden, 1)` with zero weights and bias: V = 0 everywhere before training."""
    head = nn.Linear(hidden_size, 1, dtype=torch.float32)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


def value_head_of(model: nn.Module) -> nn.Module | None:
    return getattr(model, VALUE_HEAD, None)


def _hidden_window(model: nn.Module, rollout: Rollout) -> tuple[torch.Tensor, nn.Module]:
    """The final hidden states `(rows, T, hidden)` of the positions that predict the completion tokens, and
    the output head that turns them into logits."""
    ids, att = rollout.sequences, rollout.attention_mask
    position_ids = (att.long().cumsum(dim=-1) - 1).clamp(min=0)
    window = slice(-rollout.length - 1, -1)
    parts = _decoder_and_head(model)
    if parts is not None:
        decoder, head = parts
        hidden = decoder(
            input_ids=ids, attention_mask=att, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        return hidden[:, window], head
    inputs = {"input_ids": ids, "attention_mask": att, "position_ids": position_ids}
    out = model(**inputs, use_cache=False, output_hidden_states=True)
    return out.hidden_states[-1][:, window], model.get_output_embeddings()


def policy_logprobs(
    model: nn.Module, rollout: Rollout, temperature: float, with_values: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(logp, values)`: float32 `(rows, T)` log-probs of the sampled tokens at `temperature` and, with
    `with_values`, the value head's `(rows, T)` estimates (None otherwise). Gradients flow unless the caller
    runs under `torch.no_grad()`."""
    if not with_values:
        logp = completion_logprobs(
            model, rollout.sequences, rollout.attention_mask, rollout.length, temperature
        )
        return logp, None
    value_head = value_head_of(model)
    if value_head is None:
        raise RuntimeError(f"with_values=True needs a value head attached as model.{VALUE_HEAD}")
    hidden, head = _hidden_window(model, rollout)
    logp = token_logprobs(head(hidden), rollout.completion_ids, temperature)
    values = value_head(hidden.float()).squeeze(-1)
    return logp, values
