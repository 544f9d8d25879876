"""`random:<preset>` models: a seeded random Llama with the embedded SmolLM2 tokenizer (for tests)."""

from __future__ import annotations

from typing import Any

import torch

from peftbench.errors import ConfigError, bad_value

RANDOM_PRESETS: dict[str, dict[str, Any]] = {
    # SmolLM2's shape, shrunk: GQA (4 query heads, 2 kv heads), tied embeddings, SmolLM2's vocabulary.
    "tiny-llama": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": True,
    },
}
"""Known `random:<preset>` names and their LlamaConfig values (`vocab_size` comes from the tokenizer)."""


def random_llama_config(preset: str, overrides: dict[str, Any], tokenizer: Any) -> Any:
    """LlamaConfig of `random:<preset>` plus `overrides`; vocab size and token ids from `tokenizer`."""
    from transformers import LlamaConfig

    if preset not in RANDOM_PRESETS:
        raise bad_value("model.name_or_path", f"random:{preset}", [f"random:{p}" for p in RANDOM_PRESETS])
    accepted = set(LlamaConfig().to_dict()) - {"transformers_version", "architectures", "model_type"}
    for key in overrides:
        if key not in accepted:
            raise bad_value("model.random_config key", key, sorted(accepted))
    values: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **RANDOM_PRESETS[preset],
        **overrides,
    }
    try:
        return LlamaConfig(**values)
    except Exception as error:  # e.g. hidden_size not divisible by num_attention_heads
        raise ConfigError(f"model.random_config={overrides!r} is not a valid LlamaConfig: {error}") from error


def build_random_model(config: Any, architecture: str, num_labels: int, seed: int) -> torch.nn.Module:
    """A randomly initialised model for `config`; the same seed gives the same weights.

    The global RNG state is left untouched (the init runs inside `torch.random.fork_rng`).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if architecture == "sequence_classification":
            config.num_labels = num_labels
            model = AutoModelForSequenceClassification.from_config(config)
        else:
            model = AutoModelForCausalLM.from_config(config)
    return model.eval()
