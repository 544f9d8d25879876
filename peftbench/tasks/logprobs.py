"""Per-sequence log-probabilities for causal LMs (DPO, per-example losses), and the hidden-state path.

Like `objectives.target_token_loss`, the output head runs only on the hidden states that are needed
(the labelled positions), never on the full `(batch, length, vocab)` grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from peftbench.tasks.collate import IGNORE_INDEX
from peftbench.tasks.objectives import _decoder_and_head


def hidden_and_head(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.nn.Module] | None:
    """The decoder's last hidden states and the output head, or None for models whose logits cannot be
    computed that way (see `objectives._decoder_and_head`): callers then take the full-logits path."""
    parts = _decoder_and_head(model)
    if parts is None:
        return None
    decoder, head = parts
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state, head


def labelled_logits(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The float32 logits at the labelled positions only (position t predicts `labels[t + 1]`), shape
    `(n_labelled, vocab)`; their targets and row indices `(n_labelled,)`; the labelled count per row."""
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(shift_labels)[mask]
    parts = hidden_and_head(model, input_ids, attention_mask)
    if parts is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        selected = logits[:, :-1][mask].float()
    else:
        hidden, head = parts
        selected = head(hidden[:, :-1][mask]).float()
    return selected, shift_labels[mask], rows, mask.sum(dim=1)


def response_logprobs(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the SUM of log p(label_t | prefix) over labelled tokens (labels != -100), and their count.

    Position t predicts `labels[t + 1]` (the causal shift). Returns `(logps, counts)`, both of shape
    `(batch,)`; `logps` is float32 and carries gradients when the model does.
    """
    selected, targets, rows, counts = labelled_logits(model, input_ids, attention_mask, labels)
    token_logps = -F.cross_entropy(selected, targets, reduction="none")
    logps = torch.zeros(labels.shape[0], dtype=torch.float32, device=labels.device)
    logps = logps.index_add(0, rows, token_logps)
    return logps, counts
