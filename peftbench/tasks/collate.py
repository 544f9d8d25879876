"""Prompt/target tokenization for causal LMs and the padding collator.

One example is `prompt_ids + target_ids`: the prompt is the task's template around the (truncated) source,
wrapped in the tokenizer's chat template when it has one; the target is the reference followed by EOS.
Loss is on target tokens only (`labels` is -100 on prompt and padding). Training batches are right-padded;
evaluation batches also carry the prompt alone, LEFT-padded, for `generate`, plus the reference strings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

IGNORE_INDEX = -100


@dataclass
class Encoded:
    """One tokenized example."""

    prompt_ids: list[int]
    target_ids: list[int]
    reference: str


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its EOS id (masks, not ids, decide what is padding)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer has neither a pad token nor an eos token")
    return int(pad)


def truncate_texts(tokenizer: Any, texts: Sequence[str], max_tokens: int) -> list[str]:
    """Cut each text to its first `max_tokens` tokens, returning text (cut on a character boundary)."""
    if not texts:
        return []
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
        out = []
        for text, offsets in zip(texts, encoded["offset_mapping"], strict=True):
            out.append(text if len(offsets) <= max_tokens else text[: offsets[max_tokens - 1][1]])
        return out
    encoded = tokenizer(list(texts), add_special_tokens=False)
    return [
        text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens])
        for text, ids in zip(texts, encoded["input_ids"], strict=True)
    ]


def render_prompt(tokenizer: Any, prompt: str) -> tuple[str, bool]:
    """Wrap a user prompt in the chat template if there is one; returns (text, templated)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        return text, True
    return prompt + "\n", False


def encode_examples(
    tokenizer: Any,
    template: str,
    sources: Sequence[str],
    targets: Sequence[str],
    max_source_tokens: int,
    max_target_tokens: int,
) -> list[Encoded]:
    """Tokenize `(source, target)` pairs: truncate the source, fill `template`, template, add EOS.

    The target keeps at most `max_target_tokens` tokens including the EOS. A chat-templated prompt is
    tokenized without extra special tokens (the template has them); a plain prompt gets the tokenizer's
    usual ones (e.g. BOS).
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos token; the target needs one to mark its end")
    sources = truncate_texts(tokenizer, sources, max_source_tokens)
    rendered = [render_prompt(tokenizer, template.format(source=source)) for source in sources]
    templated = bool(rendered) and rendered[0][1]
    prompts = tokenizer([text for text, _ in rendered], add_special_tokens=not templated)["input_ids"]
    target_ids = tokenizer(list(targets), add_special_tokens=False)["input_ids"] if targets else []
    return [
        Encoded(list(prompt), [*target[: max_target_tokens - 1], eos], reference)
        for prompt, target, reference in zip(prompts, target_ids, targets, strict=True)
    ]


def _pad(rows: Sequence[Sequence[int]], value: int, left: bool) -> torch.Tensor:
    """Stack ragged rows into a (B, T) long tensor, padding on the left or the right."""
    width = max(len(row) for row in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            if left:
                out[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            else:
                out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


class CausalLMCollator:
    """Pads a list of `Encoded` into a batch.

    Always: `input_ids`, `attention_mask` (right-padded), `labels` (-100 on prompt and padding).
    With `for_generation=True` also: `gen_input_ids`, `gen_attention_mask` (prompt only, left-padded)
    and `references` (list of strings).
    """

    def __init__(self, pad_id: int, for_generation: bool = False) -> None:
        self.pad_id = pad_id
        self.for_generation = for_generation

    def __call__(self, examples: Sequence[Encoded]) -> dict[str, Any]:
        """Build the batch dict."""
        full = [ex.prompt_ids + ex.target_ids for ex in examples]
        labels = [[IGNORE_INDEX] * len(ex.prompt_ids) + ex.target_ids for ex in examples]
        batch: dict[str, Any] = {
            "input_ids": _pad(full, self.pad_id, left=False),
            "attention_mask": _pad([[1] * len(row) for row in full], 0, left=False),
            "labels": _pad(labels, IGNORE_INDEX, left=False),
        }
        if self.for_generation:
            prompts = [ex.prompt_ids for ex in examples]
            batch["gen_input_ids"] = _pad(prompts, self.pad_id, left=True)
            batch["gen_attention_mask"] = _pad([[1] * len(row) for row in prompts], 0, left=True)
            batch["references"] = [ex.reference for ex in examples]
        return batch
