"""`load_model(cfg) -> (model, tokenizer)`: one entry point for embedded, random, hub and local models.

`model.gradient_checkpointing: true` switches on transformers' activation checkpointing of every decoder
layer (non-reentrant `torch.utils.checkpoint`: a layer's activations are recomputed in the backward pass
instead of kept, which trades about one extra forward for the activation memory of the layers).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from peftbench.errors import ConfigError, bad_value
from peftbench.models import embedded, tiny
from peftbench.models.spec import ModelSpec


def load_model(cfg: Any) -> tuple[torch.nn.Module, Any]:
    """Load the model and tokenizer that the `model` config group describes.

    `cfg` is a DictConfig, a mapping or a `ModelSpec` with the keys of `ModelSpec`, plus the optional
    `gradient_checkpointing` (default false). Returns the model in eval mode, on CPU, in `cfg.dtype`, and its
    tokenizer with a pad token (eos where the checkpoint has none; the padding side is left as the
    checkpoint sets it). Bad values raise `ConfigError`.
    """
    cfg, checkpointing = _split_runtime_options(cfg)
    model, tokenizer = _load(ModelSpec.from_config(cfg))
    if checkpointing:  # an image model checkpoints its language model's layers
        adapted = getattr(model, "adapted_module", None)
        enable_gradient_checkpointing(adapted() if callable(adapted) else model)
    return model, tokenizer


def _split_runtime_options(cfg: Any) -> tuple[Any, bool]:
    """`(cfg without gradient_checkpointing, gradient_checkpointing)`: an option of the loaded model's
    training, not of what is loaded (a `ModelSpec` has no such field)."""
    if isinstance(cfg, ModelSpec):
        return cfg, False
    values = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    if not isinstance(values, Mapping) or "gradient_checkpointing" not in values:
        return cfg, False
    values = dict(values)
    checkpointing = values.pop("gradient_checkpointing")
    if checkpointing is None:
        checkpointing = False
    if not isinstance(checkpointing, bool):
        raise bad_value("model.gradient_checkpointing", checkpointing, "true, false")
    return values, checkpointing


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant activation checkpointing of every decoder layer (transformers' switch). transformers
    also makes the input embeddings' output require grad, so gradients reach adapter layers inside a
    checkpointed layer even when everything before it is frozen (what reentrant checkpointing needs;
    harmless for the non-reentrant kind). Active in training mode only."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise bad_value(
            "model.gradient_checkpointing", True, f"false ({type(model).__name__} does not support it)"
        )
    kwargs = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5
    if callable(enable):
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _load(spec: ModelSpec) -> tuple[torch.nn.Module, Any]:
    """The model `spec` names; an image model (`spec.vision`, a LLaVA directory, a merged image model's
    directory) comes wrapped behind `peftbench.models.multimodal.ImageTextModel`."""
    from peftbench.models import llava, multimodal

    vision = spec.vision
    if spec.scheme == "random":
        model, tokenizer = _load_random(spec)
    elif spec.scheme == "embedded":
        entry = embedded.get_embedded(spec.source)
        if spec.architecture not in entry.architectures:
            raise ConfigError(
                f"model.architecture={spec.architecture!r} is not valid for embedded:{entry.name}; "
                f"accepted: {', '.join(entry.architectures)}"
            )
        model, tokenizer = _load_pretrained(spec, embedded.model_dir(entry.name), local=True)
    else:
        where, local = _resolve_hf(spec.name_or_path)
        if local and llava.is_llava_dir(Path(where)):
            return llava.load_llava(Path(where), spec.torch_dtype, vision)
        merged = multimodal.merged_vision_spec(Path(where)) if local else None
        if merged is not None:  # a merged image model: its projector beside it, the switches given win
            projector = str(Path(where) / multimodal.PROJECTOR_FILE)
            vision = {**merged, **(vision or {}), "projector_from": projector}
        model, tokenizer = _load_pretrained(spec, where, local)
    if vision is None:
        return model, tokenizer
    if spec.architecture != "causal_lm":
        raise bad_value("model.architecture", spec.architecture, "causal_lm (an image model answers in text)")
    return multimodal.wrap_vision(model, vision, spec.seed), tokenizer


def _resolve_hf(name_or_path: str) -> tuple[str | Path, bool]:
    """(what to pass to from_pretrained, whether it is a local directory); ConfigError for a bad path."""
    path = Path(_absolute(os.path.expanduser(name_or_path)))
    looks_local = (
        name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1 or "\\" in name_or_path
    )
    if not path.exists():
        if looks_local:
            raise ConfigError(
                f"model.name_or_path={name_or_path!r} is not valid; the local path {path} does not exist"
            )
        return name_or_path, False  # a hub id
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ConfigError(
            f"model.name_or_path={name_or_path!r} is not valid; accepted: a model directory with a "
            f"config.json (as written by save_pretrained), a hub id, embedded:<name> or random:<preset>"
        )
    return path, True


def _absolute(path: str) -> str:
    """Resolve a relative path against the launch directory (Hydra may have changed the working dir)."""
    try:
        from hydra.utils import to_absolute_path

        return to_absolute_path(path)
    except Exception:  # no hydra, or hydra not initialised in a way it can answer
        return os.path.abspath(path)


def _load_pretrained(spec: ModelSpec, where: str | Path, local: bool) -> tuple[torch.nn.Module, Any]:
    """`from_pretrained` for a local directory or a hub id, errors wrapped into ConfigError."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    offline = local or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    common: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code, "local_files_only": offline}
    with embedded.wrap_errors("the tokenizer", where):
        tokenizer = AutoTokenizer.from_pretrained(str(where), **common)
    kwargs: dict[str, Any] = {**common, "dtype": spec.torch_dtype}
    auto = AutoModelForCausalLM
    if spec.architecture == "sequence_classification":
        auto, kwargs["num_labels"] = AutoModelForSequenceClassification, spec.num_labels
    with embedded.wrap_errors("the model", where), torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)  # a new head (classification) is initialised deterministically
        model = auto.from_pretrained(str(where), **kwargs)
    _ensure_pad_token(model, tokenizer)
    return model.eval(), tokenizer


def _load_random(spec: ModelSpec) -> tuple[torch.nn.Module, Any]:
    """A seeded random Llama (`random:<preset>`) with the embedded SmolLM2 tokenizer."""
    from transformers import AutoTokenizer

    directory = embedded.tokenizer_dir()
    with embedded.wrap_errors("the tokenizer", directory):
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    _ensure_pad_token(None, tokenizer)
    config = tiny.random_llama_config(spec.source, spec.random_config, tokenizer)
    model = tiny.build_random_model(config, spec.architecture, spec.num_labels, spec.seed)
    model.config.name_or_path = spec.name_or_path
    return model.to(spec.torch_dtype), tokenizer


def _ensure_pad_token(model: torch.nn.Module | None, tokenizer: Any) -> None:
    """Give the tokenizer a pad token (eos) if it has none, and the model config the pad id if missing."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tokenizer.pad_token_id
