"""Causal-LM objectives shared by the generative tasks.

The loss only needs logits where a label exists (a headline's ~10 tokens out of ~200), so the output
head runs on those hidden states alone: no full `(batch, length, vocab)` fp32 logits are materialised,
which saves the head's FLOPs (a fifth of SmolLM2-135M's) and most of the activation memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from peftbench.tasks.collate import IGNORE_INDEX

#: config attributes that change logits after the output head; such models take the full-logits path
_POST_HEAD_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


def _decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    get_decoder = getattr(model, "get_decoder", None)
    get_head = getattr(model, "get_output_embeddings", None)
    if not (callable(get_decoder) and callable(get_head)):
        return None
    config = getattr(model, "config", None)
    if any(getattr(config, attr, None) not in (None, 1, 1.0) for attr in _POST_HEAD_TRANSFORMS):
        return None
    decoder, head = get_decoder(), get_head()
    if decoder is None or head is None or decoder is model:
        return None
    return decoder, head


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over positions whose label is not -100, and their count.

    Position t predicts labels[t + 1]; only the selected rows of the logits are cast to float32.
    """
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    n_tokens = int(mask.sum())
    selected = logits[:, :-1][mask].float()
    loss = F.cross_entropy(selected, shift_labels[mask], reduction="sum") / max(n_tokens, 1)
    return loss, n_tokens


def target_token_loss(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """`causal_lm_loss` computed with the output head applied to the labelled positions only.

    Equal to the full-logits loss (same hidden states, same head); falls back to it for models whose
    logits are transformed after the head or that expose no decoder.
    """
    parts = _decoder_and_head(model)
    if parts is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return causal_lm_loss(logits, labels)
    decoder, head = parts
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    n_tokens = int(mask.sum())
    logits = head(hidden[:, :-1][mask]).float()
    loss = F.cross_entropy(logits, shift_labels[mask], reduction="sum") / max(n_tokens, 1)
    return loss, n_tokens
