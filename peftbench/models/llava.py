"""A transformers LLaVA-style model (`LlavaForConditionalGeneration`) behind the `ImageTextModel` interface.

`model.name_or_path=<a local directory>` whose `config.json` has `model_type: llava` loads the model, its
tokenizer and its image processor (`preprocessor_config.json`) from that directory, nothing downloaded. The
method adapts its language model only (`adapted_module`); the freeze switches of `model.vision` apply to its
`vision_tower` and `multi_modal_projector`. Each example's image becomes the model's image placeholder
token repeated once per image feature, put before the first real text token (labels -100), and the model
itself puts the projected image features there (LLaVA, arXiv 2304.08485, section 4.1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftbench.errors import ConfigError, bad_value
from peftbench.models.multimodal import IGNORE_INDEX, FreezeSwitches, ImageTextModel

LLAVA_TYPES = ("llava",)


def _part(model: nn.Module, *paths: str) -> nn.Module:
    """The first of `paths` (dotted attributes) that `model` has: transformers moved LLaVA's parts under
    `model.model` in version 4.52."""
    for path in paths:
        found: Any = model
        for name in path.split("."):
            found = getattr(found, name, None)
            if found is None:
                break
        if isinstance(found, nn.Module):
            return found
    raise ConfigError(f"{type(model).__name__} has none of {', '.join(paths)}; accepted: a LLaVA model")


class HfLlavaModel(ImageTextModel):
    """A `LlavaForConditionalGeneration` with its image processor (see the module doc)."""

    def __init__(self, hf: nn.Module, image_processor: Any, switches: FreezeSwitches) -> None:
        super().__init__()
        self.hf = hf
        self.image_processor = image_processor
        self.switches = switches
        self.language_model = _part(hf, "model.language_model", "language_model")
        self.vision_tower = _part(hf, "model.vision_tower", "vision_tower")
        self.multi_modal_projector = _part(hf, "model.multi_modal_projector", "multi_modal_projector")
        config = hf.config
        token = getattr(config, "image_token_id", None)
        self.image_token_id = int(token if token is not None else config.image_token_index)
        vision = config.vision_config
        tokens = (vision.image_size // vision.patch_size) ** 2
        self.num_image_tokens = tokens + (config.vision_feature_select_strategy == "full")

    @property
    def config(self) -> Any:
        return self.hf.config.text_config

    def get_output_embeddings(self) -> nn.Module | None:
        return self.hf.get_output_embeddings()

    def side_modules(self) -> dict[str, nn.Module]:
        return {"vision_tower": self.vision_tower, "multi_modal_projector": self.multi_modal_projector}

    def trained_beside(self) -> list[nn.Module]:
        out = [] if self.switches.freeze_multi_modal_projector else [self.multi_modal_projector]
        return out + ([] if self.switches.freeze_vision_tower else [self.vision_tower])

    def pixel_values(self, images: Sequence[str | Path]) -> torch.Tensor:
        from peftbench.models.vision import load_image

        pil = [load_image(path) for path in images]
        values = self.image_processor(images=pil, return_tensors="pt")["pixel_values"]
        return values.to(self.vision_tower.dtype if hasattr(self.vision_tower, "dtype") else torch.float32)

    def _inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor | None,
        images: Sequence[str | Path] | None,
        pixel_values: torch.Tensor | None,
    ) -> dict[str, Any]:
        """The placeholder tokens spliced in before each example's first real token."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if pixel_values is None and images is not None:
            pixel_values = self.pixel_values(images)
        if pixel_values is None:
            return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        n = self.num_image_tokens
        ids, masks, labs = [], [], []
        lead = (attention_mask.cumsum(1) == 0).sum(1).tolist()
        placeholder = input_ids.new_full((n,), self.image_token_id)
        for i, k in enumerate(lead):
            ids.append(torch.cat([input_ids[i, :k], placeholder, input_ids[i, k:]]))
            masks.append(
                torch.cat([attention_mask[i, :k], attention_mask.new_ones(n), attention_mask[i, k:]])
            )
            if labels is not None:
                labs.append(torch.cat([labels[i, :k], labels.new_full((n,), IGNORE_INDEX), labels[i, k:]]))
        out = {"input_ids": torch.stack(ids), "attention_mask": torch.stack(masks)}
        out["labels"] = torch.stack(labs) if labels is not None else None
        out["pixel_values"] = pixel_values.to(input_ids.device)
        return out

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        images: Sequence[str | Path] | None = None,
        pixel_values: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        return self.hf(**self._inputs(input_ids, attention_mask, labels, images, pixel_values), **kwargs)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        images: Sequence[str | Path] | None = None,
        pixel_values: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        inputs = self._inputs(input_ids, attention_mask, None, images, pixel_values)
        inputs.pop("labels")
        out = self.hf.generate(**inputs, **kwargs)
        return torch.cat([input_ids, out[:, inputs["input_ids"].shape[1] :]], dim=1)

    def save_pretrained(self, directory: str | Path, **kwargs: Any) -> None:
        self.hf.save_pretrained(str(directory), **kwargs)
        self.image_processor.save_pretrained(str(directory))


def is_llava_dir(path: Path) -> bool:
    """Whether `path/config.json` describes a LLaVA-style model."""
    import json

    try:
        return json.loads((path / "config.json").read_text()).get("model_type") in LLAVA_TYPES
    except (OSError, ValueError):
        return False


def load_llava(
    path: Path, dtype: torch.dtype, vision: Mapping[str, Any] | None, local: bool = True
) -> tuple[HfLlavaModel, Any]:
    """`(model, tokenizer)` of a local LLaVA directory: model, tokenizer and image processor from it."""
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration

    from peftbench.models.embedded import wrap_errors

    values = dict(vision or {})
    accepted = ("freeze_vision_tower", "freeze_multi_modal_projector", "freeze_language_model")
    unknown = sorted(k for k in values if k not in accepted)
    if unknown:
        raise bad_value("model.vision key", unknown[0], f"{', '.join(accepted)} (for a LLaVA model)")
    switches = FreezeSwitches.from_mapping(values)
    with wrap_errors("the tokenizer", path):
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=local)
    with wrap_errors("the image processor", path, "save one with the model (preprocessor_config.json)"):
        processor = AutoImageProcessor.from_pretrained(str(path), local_files_only=local)
    with wrap_errors("the model", path):
        hf = LlavaForConditionalGeneration.from_pretrained(str(path), dtype=dtype, local_files_only=local)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return HfLlavaModel(hf, processor, switches).eval(), tokenizer
