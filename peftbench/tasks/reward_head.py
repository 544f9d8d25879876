"""A scalar reward head on a causal LM's last hidden state (InstructGPT, arXiv 2203.02155, Sec. 3.5: the
unembedding layer replaced by a projection to one scalar), read at each sequence's last non-padding token.

The head is a child of the model (`model.reward_head`), so the optimizer groups, checkpoints and the saved
adapter (`methods/io.py`: every trainable tensor) hold it like any trainable parameter; it is not a linear
layer, so no method wraps or adapts it. Its tensors are float32 whatever the base dtype (a bf16 master
weight loses small updates), and it starts from the same seeded draw in every run, so the untuned score
(`untuned_score.py`, cached per study, not per seed) is one number.
"""

from __future__ import annotations

import torch
from torch import nn

from peftbench.errors import ConfigError

#: the attribute of the model that holds the head (its tensors are `reward_head.weight` / `.bias`)
HEAD_NAME = "reward_head"
#: the draw every head starts from
HEAD_SEED = 0


class ScalarHead(nn.Module):
    """`r = w . h + b`: weight ~ N(0, 1/d) from a fixed seed (rewards of the hidden state's scale), bias 0."""

    def __init__(self, hidden_size: int, seed: int = HEAD_SEED) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        weight = torch.randn(hidden_size, generator=generator) / hidden_size**0.5
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """`(..., d)` hidden states to `(...)` float32 rewards."""
        return hidden.float() @ self.weight + self.bias


def decoder_of(model: nn.Module, task: str) -> nn.Module:
    """The transformer backbone whose last hidden states the head reads (`model.get_decoder()`); a
    one-line ConfigError for a model without one."""
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    if not isinstance(decoder, nn.Module) or decoder is model:
        raise ConfigError(
            f"task={task!r} needs a causal LM with a decoder backbone (model.get_decoder()); "
            f"{type(model).__name__} has none"
        )
    return decoder


def attach_head(model: nn.Module, task: str) -> ScalarHead:
    """The model's reward head, created (on the model's device) when it has none yet."""
    head = getattr(model, HEAD_NAME, None)
    if isinstance(head, ScalarHead):
        return head
    if head is not None:
        raise ConfigError(f"task={task!r}: the model already has a {HEAD_NAME!r} that is not a scalar head")
    hidden_size = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(hidden_size, int):
        raise ConfigError(f"task={task!r} needs model.config.hidden_size; {type(model).__name__} has none")
    head = ScalarHead(hidden_size)
    device = next(model.parameters()).device
    model.add_module(HEAD_NAME, head.to(device))
    return head


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Per row, the position of the last non-padding token (left or right padding alike)."""
    length = attention_mask.shape[1]
    positions = torch.arange(1, length + 1, device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(dim=1)


def sequence_rewards(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """`(batch,)` float32 rewards: the head on each row's last non-padding hidden state. Positions count
    real tokens only (`cumsum(mask) - 1`), so a left-padded row scores as it would unpadded."""
    head = getattr(model, HEAD_NAME, None)
    if not isinstance(head, ScalarHead):
        raise RuntimeError(f"the model has no {HEAD_NAME}: call attach_head(model) first")
    decoder = decoder_of(model, "reward_model")
    position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
    out = decoder(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    )
    hidden = out.last_hidden_state
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return head(hidden[rows, last_token_index(attention_mask)])
