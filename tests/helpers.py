"""Small builders shared by the tests (no tokenizer, no downloads)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(seed: int = 0, vocab: int = 128, tie: bool = True, bias: bool = False) -> LlamaForCausalLM:
    """A 2-layer random Llama with every linear kind (q/k/v/o, gate/up/down) and GQA."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        tie_word_embeddings=tie,
        attention_bias=bias,
        mlp_bias=bias,
    )
    return LlamaForCausalLM(config).eval()


def token_batch(vocab: int = 128, batch: int = 2, length: int = 9, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=generator)


def clone_model(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model)
