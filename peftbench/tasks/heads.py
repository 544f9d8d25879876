"""What kind of model a task is given: a causal LM (it has a language-model head), or a classifier whose own
head is found structurally."""

from __future__ import annotations

import torch


def is_causal_lm(model: torch.nn.Module) -> bool:
    """Whether the model has a language-model output head (`get_output_embeddings()` is a module)."""
    get_out = getattr(model, "get_output_embeddings", None)
    return callable(get_out) and get_out() is not None


def classifier_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """A sequence-classification model's own head, found structurally; None for other models.

    The head is what the model holds besides its backbone (the child named by `base_model_prefix`):
    the children with parameters (`classifier` in BERT/RoBERTa, `score` in Llama). Several such children
    are returned together in a `ModuleList` (not attached to the model). A model with an LM head is not a
    classifier.
    """
    if is_causal_lm(model):
        return None
    prefix = getattr(model, "base_model_prefix", "")
    backbone = getattr(model, prefix, None) if prefix else None
    if not isinstance(backbone, torch.nn.Module) or backbone is model:
        return None
    heads = [
        child for child in model.children() if child is not backbone and any(True for _ in child.parameters())
    ]
    if not heads:
        return None
    return heads[0] if len(heads) == 1 else torch.nn.ModuleList(heads)
