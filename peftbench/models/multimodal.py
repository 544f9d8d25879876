"""Image + text models: a vision encoder and a projector in front of a causal language model (LLaVA,
arXiv 2304.08485, section 4.1; LLaVA-1.5, arXiv 2310.03744, section 3.1).

Two kinds share one interface (`ImageTextModel`):

- `VisionLanguageModel` (`model=vision_smollm2`): the frozen EfficientNet-Lite0 (ImageNet-trained, NOT
  language-aligned; `peftbench.models.vision`), a LLaVA-1.5 projector (Linear -> GELU -> Linear, a norm at
  the text embeddings' scale) and a causal LM. The encoder's tokens are cached per image file.
- `HfLlavaModel` (`model.name_or_path=<a local LLaVA directory>`): a transformers
  `LlavaForConditionalGeneration` and its image processor, driven through the same calls.

Both take `input_ids` / `attention_mask` / `labels` plus the images (`images`: file paths; or
`pixel_values`; or, for the EfficientNet model, cached `image_features`), put the image tokens before each
example's first real text token (after any left padding) and give them label -100: image positions carry
no loss. `generate` answers from an image with the language model's KV cache and returns the prompt ids
followed by the new tokens, as a text model's `generate` does.

What trains is decided by the freeze switches (LLaMA-Factory's names, `FreezeSwitches`): the vision tower
(always frozen for EfficientNet-Lite0), the projector, the language model. A PEFT method only ever sees the
language model (`adapted_module`, read by `peftbench.methods.walker.adapted_part`); the projector trains
beside it like a task head (`trained_beside`) and is saved with the adapter.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftbench.errors import ConfigError, bad_value

IGNORE_INDEX = -100
VISION_FILE = "peftbench_vision.json"
"""Written beside a merged image model: how to rebuild its encoder and projector."""
PROJECTOR_FILE = "projector.safetensors"
"""The projector's tensors beside a merged model or a PEFT export."""
ENCODERS = ("efficientnet-lite0",)
PROJECTOR_PREFIX = "projector."


@dataclass(frozen=True)
class FreezeSwitches:
    """What stays frozen (LLaMA-Factory's freeze_vision_tower / freeze_multi_modal_projector /
    freeze_language_model). Stage 1 (alignment): language model frozen, projector trained; stage 2: the
    method on the language model, projector trained or frozen."""

    freeze_vision_tower: bool = True
    freeze_multi_modal_projector: bool = False
    freeze_language_model: bool = False

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> FreezeSwitches:
        found = {}
        for f in fields(cls):
            value = values.get(f.name, f.default)
            if not isinstance(value, bool):
                raise bad_value(f"model.vision.{f.name}", value, "true, false")
            found[f.name] = value
        return cls(**found)


@dataclass(frozen=True)
class VisionSpec:
    """The `model.vision` config: the encoder, its input size, the projector and the freeze switches.

    `projector_from`: a run directory, adapter directory or adapter file whose `projector.*` tensors start
    this projector (stage 2 starts from the projector stage 1 aligned). `feature_cache`: keep the encoder's
    tokens per image on disk (`$PEFTBENCH_CACHE/features`)."""

    encoder: str = "efficientnet-lite0"
    image_size: int = 96
    pretrained: bool = True
    projector_hidden: int | None = None
    projector_norm: bool = True
    projector_from: str | None = None
    feature_cache: bool = True
    #: what the encoder was trained for, carried into every record's config (informational)
    encoder_training: str = "ImageNet-1k classification; not aligned with language"
    switches: FreezeSwitches = FreezeSwitches()

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> VisionSpec:
        from peftbench.models.vision import check_image_size

        values = dict(values or {})
        switch_keys = {f.name for f in fields(FreezeSwitches)}
        known = {f.name for f in fields(cls) if f.name != "switches"} | switch_keys
        unknown = sorted(k for k in values if k not in known)
        if unknown:
            raise bad_value("model.vision key", unknown[0], sorted(known))
        switches = FreezeSwitches.from_mapping({k: v for k, v in values.items() if k in switch_keys})
        spec = {k: v for k, v in values.items() if k not in switch_keys and v is not None}
        if spec.get("encoder", "efficientnet-lite0") not in ENCODERS:
            raise bad_value("model.vision.encoder", spec["encoder"], ENCODERS)
        try:
            check_image_size(spec.get("image_size", 96))
        except ConfigError:
            raise bad_value(
                "model.vision.image_size", spec.get("image_size"), "a multiple of 32 (96 -> 9 tokens)"
            ) from None
        if not isinstance(spec.get("encoder_training", ""), str):
            raise bad_value(
                "model.vision.encoder_training", spec["encoder_training"], "a text (informational)"
            )
        for key in ("pretrained", "projector_norm", "feature_cache"):
            if key in spec and not isinstance(spec[key], bool):
                raise bad_value(f"model.vision.{key}", spec[key], "true, false")
        hidden = spec.get("projector_hidden")
        if hidden is not None and (isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1):
            raise bad_value("model.vision.projector_hidden", hidden, "an integer >= 1, or null (d_model)")
        if not switches.freeze_vision_tower:
            raise bad_value(
                "model.vision.freeze_vision_tower",
                False,
                "true (EfficientNet-Lite0 stays frozen: its tokens are cached per image)",
            )
        return cls(**spec, switches=switches)

    def to_mapping(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "switches"}
        return out | asdict(self.switches)


def splice(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Put each example's image tokens (B, N, d) right before its first real text token (after left
    padding; at position 0 for right-padded rows): `(embeds, attention_mask, labels)` of length N + T,
    the image positions attended to and labelled -100."""
    rows, masks, labs = [], [], []
    n = image_embeds.shape[1]
    lead = (attention_mask.cumsum(1) == 0).sum(1).tolist()  # left padding of each row
    ones = attention_mask.new_ones(n)
    for i, k in enumerate(lead):
        rows.append(
            torch.cat([text_embeds[i, :k], image_embeds[i].to(text_embeds.dtype), text_embeds[i, k:]])
        )
        masks.append(torch.cat([attention_mask[i, :k], ones, attention_mask[i, k:]]))
        if labels is not None:
            ignore = labels.new_full((n,), IGNORE_INDEX)
            labs.append(torch.cat([labels[i, :k], ignore, labels[i, k:]]))
    return torch.stack(rows), torch.stack(masks), torch.stack(labs) if labels is not None else None


class ImageTextModel(nn.Module):
    """The interface every image + text model here keeps (see the module doc)."""

    #: capability: the model takes images (`peftbench.models.multimodal.takes_images`)
    takes_images = True
    language_model: nn.Module
    switches: FreezeSwitches

    # ----- what a method adapts, what trains beside it ------------------------------------------------
    def adapted_module(self) -> nn.Module:
        """The part a PEFT method adapts: the language model only."""
        return self.language_model

    def side_modules(self) -> dict[str, nn.Module]:
        """The image-side modules by name (projector; vision tower)."""
        raise NotImplementedError

    def trained_beside(self) -> list[nn.Module]:
        """The modules that train beside the method (like a task head), by the freeze switches."""
        raise NotImplementedError

    def apply_freeze_switches(self) -> None:
        """Image side trainable or frozen by the switches; the whole language model (the method's layers
        too) frozen with `freeze_language_model`."""
        for module in self.side_modules().values():
            module.requires_grad_(False)
        for module in self.trained_beside():
            module.requires_grad_(True)
        if self.switches.freeze_language_model:
            self.language_model.requires_grad_(False)

    def set_freeze_switches(self, values: Mapping[str, Any]) -> None:
        """New freeze switches (a stage's, `stages[k].freeze`), from a `model.vision` mapping; applied by
        the method's `mark_trainable`."""
        self.switches = FreezeSwitches.from_mapping(
            {f.name: values.get(f.name, getattr(self.switches, f.name)) for f in fields(FreezeSwitches)}
        )

    def projector_parameters(self) -> int:
        """Trainable parameters on the image side (reported apart from the method's)."""
        from peftbench.models.params import count_parameters

        return sum(count_parameters(m, trainable_only=True) for m in self.side_modules().values())

    # ----- transformers-like surface -----------------------------------------------------------------
    @property
    def config(self) -> Any:
        return self.language_model.config

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.get_input_embeddings().weight.dtype

    @property
    def device(self) -> torch.device:
        return self.language_model.get_input_embeddings().weight.device

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        return self.language_model.get_output_embeddings()

    def can_generate(self) -> bool:
        return True

    # ----- images ------------------------------------------------------------------------------------
    def image_embeds(self, **image: Any) -> torch.Tensor | None:
        """(B, N, d) image tokens in the language model's embedding space, or None without an image."""
        raise NotImplementedError

    def build_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor | None,
        image: Mapping[str, Any],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """`(inputs_embeds, attention_mask, labels)` with the image tokens spliced in (`splice`)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        text = self.language_model.get_input_embeddings()(input_ids)
        images = self.image_embeds(**image)
        if images is None:
            return text, attention_mask, labels
        if images.shape[0] != input_ids.shape[0]:
            raise ValueError(f"{images.shape[0]} images for a batch of {input_ids.shape[0]} examples")
        return splice(images.to(text.device), text, attention_mask, labels)


def takes_images(model: Any) -> bool:
    """Whether `model` is an image + text model (its `takes_images` capability)."""
    return bool(getattr(model, "takes_images", False))


class VisionLanguageModel(ImageTextModel):
    """Frozen EfficientNet-Lite0 + projector + causal LM (`model=vision_smollm2`)."""

    def __init__(
        self, language_model: nn.Module, spec: VisionSpec, cache_dir: str | Path | None = None
    ) -> None:
        from peftbench.models.vision import FeatureCache, Projector, VisionEncoder, embedding_rms

        super().__init__()
        self.spec = spec
        self.switches = spec.switches
        self.language_model = language_model
        self.encoder = VisionEncoder(spec.image_size, spec.pretrained)
        embeddings = language_model.get_input_embeddings().weight
        scale = embedding_rms(embeddings) if spec.projector_norm else None
        self.projector = Projector(embeddings.shape[1], hidden_dim=spec.projector_hidden, out_scale=scale)
        self.projector.to(embeddings.dtype)
        self.features = FeatureCache(self.encoder, cache_dir)

    def side_modules(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder, "projector": self.projector}

    def set_freeze_switches(self, values: Mapping[str, Any]) -> None:
        super().set_freeze_switches(values)
        if not self.switches.freeze_vision_tower:
            raise bad_value(
                "model.vision.freeze_vision_tower", False, "true (EfficientNet-Lite0 stays frozen: cached)"
            )

    def trained_beside(self) -> list[nn.Module]:
        return [] if self.switches.freeze_multi_modal_projector else [self.projector]

    def image_embeds(
        self,
        images: Sequence[str | Path] | None = None,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        if image_features is None and pixel_values is not None:
            image_features = self.encoder(pixel_values)
        if image_features is None and images is not None:
            image_features = self.features.tokens(list(images))
        if image_features is None:
            return None
        param = self.projector.fc1.weight
        return self.projector(image_features.to(param.device))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        images: Sequence[str | Path] | None = None,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """The language model's output on [image tokens, text] (labels -100 on image positions)."""
        image = {"images": images, "pixel_values": pixel_values, "image_features": image_features}
        embeds, mask, labels = self.build_inputs(input_ids, attention_mask, labels, image)
        return self.language_model(inputs_embeds=embeds, attention_mask=mask, labels=labels, **kwargs)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        images: Sequence[str | Path] | None = None,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Prompt ids followed by the new tokens, generated from [image tokens, prompt] (KV cache)."""
        image = {"images": images, "pixel_values": pixel_values, "image_features": image_features}
        embeds, mask, _ = self.build_inputs(input_ids, attention_mask, None, image)
        new = self.language_model.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
        return torch.cat([input_ids, new.to(input_ids.device)], dim=1)

    def save_pretrained(self, directory: str | Path, **kwargs: Any) -> None:
        """The language model (`save_pretrained`), the projector (`projector.safetensors`) and how to
        rebuild the encoder (`peftbench_vision.json`): `model.name_or_path=<directory>` loads it back."""
        from safetensors.torch import save_file

        directory = Path(directory)
        self.language_model.save_pretrained(str(directory), **kwargs)
        state = {k: v.detach().cpu().contiguous() for k, v in self.projector.state_dict().items()}
        save_file(state, str(directory / PROJECTOR_FILE))
        spec = self.spec.to_mapping() | {"projector_from": None}
        (directory / VISION_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")


def projector_state(source: str | Path) -> dict[str, torch.Tensor]:
    """The `projector.*` tensors (prefix dropped) of a run directory, adapter directory, adapter file or
    a `projector.safetensors`; a one-line ConfigError naming the path when it has none."""
    from safetensors.torch import load_file

    path = Path(source).expanduser()
    for candidate in (path, path / "adapter.safetensors", path / "adapter" / "adapter.safetensors"):
        if candidate.is_file():
            path = candidate
            break
    else:
        raise ConfigError(
            f"model.vision.projector_from={str(source)!r}: no such file; accepted: a run directory, an "
            "adapter directory or an adapter.safetensors holding projector.* tensors"
        )
    try:
        state = load_file(str(path))
    except Exception as err:
        raise ConfigError(f"model.vision.projector_from={str(path)!r} is not readable ({err})") from None
    if path.name == PROJECTOR_FILE:
        return state
    found = {k.removeprefix(PROJECTOR_PREFIX): v for k, v in state.items() if k.startswith(PROJECTOR_PREFIX)}
    if not found:
        raise ConfigError(
            f"model.vision.projector_from={str(path)!r} holds no projector.* tensors (was the projector "
            "trained in that run?); accepted: the adapter of an image-model run that trained its projector"
        )
    return found


def load_projector(model: VisionLanguageModel, source: str | Path) -> None:
    """Start `model`'s projector from `source` (`projector_state`); ConfigError on a shape mismatch."""
    state = projector_state(source)
    try:
        model.projector.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = " ".join(str(err).split())[:200]
        raise ConfigError(
            f"model.vision.projector_from={str(source)!r} does not fit this projector ({first})"
        ) from None


def feature_cache_dir() -> Path:
    """Where encoder tokens are cached: `$PEFTBENCH_CACHE/features` (default ~/.cache/peftbench)."""
    from peftbench.models.embedded import cache_root

    return cache_root().parent / "features"


def wrap_vision(
    language_model: nn.Module, vision: Mapping[str, Any] | VisionSpec, seed: int = 0
) -> VisionLanguageModel:
    """The language model behind a frozen encoder and a projector seeded by `seed` (or started from
    `projector_from`), its freeze switches applied (nothing of it trains before a method is applied)."""
    spec = vision if isinstance(vision, VisionSpec) else VisionSpec.from_mapping(vision)
    cache = feature_cache_dir() if spec.feature_cache else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VisionLanguageModel(language_model, spec, cache)
    if spec.projector_from:
        load_projector(model, spec.projector_from)
    return model.eval()


def merged_vision_spec(directory: Path) -> dict[str, Any] | None:
    """The `peftbench_vision.json` of a merged image model directory, or None."""
    file = directory / VISION_FILE
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{file} is not readable ({err})") from None
