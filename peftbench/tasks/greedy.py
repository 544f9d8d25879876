"""Greedy answers of a causal LM to a batch of prompts (generation tasks score them)."""

from __future__ import annotations

from typing import Any

import torch

from peftbench.tasks.collate import pad_token_id


@torch.no_grad()
def greedy_answers(model: Any, tokenizer: Any, batch: dict[str, Any], max_new_tokens: int) -> list[str]:
    """Greedy continuations of the batch's left-padded prompts (`gen_input_ids`, `gen_attention_mask`):
    the new tokens only, decoded without special tokens, stripped."""
    prompt_ids = batch["gen_input_ids"]
    output = model.generate(
        input_ids=prompt_ids,
        attention_mask=batch["gen_attention_mask"],
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_token_id(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
    )
    texts = tokenizer.batch_decode(output[:, prompt_ids.shape[1] :], skip_special_tokens=True)
    return [text.strip() for text in texts]
