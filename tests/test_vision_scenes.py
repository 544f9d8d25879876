"""The image path's building blocks: synthetic scenes (deterministic, disjoint, answers true to the pixels),
the frozen EfficientNet-Lite0 encoder and its tokens, the projector's gradients, the feature cache, and
one-line errors for bad image data."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from peftbench.errors import ConfigError
from peftbench.models.vision import (
    FeatureCache,
    Projector,
    VisionEncoder,
    check_image_size,
    embedding_rms,
    num_image_tokens,
    preprocess,
)
from peftbench.tasks.scenes_data import (
    COLOURS,
    POSITIONS,
    SceneConfig,
    draw_scene,
    exact_match,
    generate_splits,
    normalise_answer,
    read_image_jsonl,
    write_scenes,
)

SIZES = {"train": 12, "val": 4, "test": 6}


@pytest.fixture(scope="module")
def encoder() -> VisionEncoder:
    return VisionEncoder(96)


@pytest.fixture(scope="module")
def scenes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("scenes")
    write_scenes(root, seed=7, sizes=SIZES)
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generator_is_deterministic_per_seed(scenes_dir: Path, tmp_path: Path) -> None:
    write_scenes(tmp_path, seed=7, sizes=SIZES)
    assert _files(tmp_path) == _files(scenes_dir)  # same JSONL and byte-identical PNGs
    assert generate_splits(7, SIZES) == generate_splits(7, SIZES)
    assert generate_splits(8, SIZES) != generate_splits(7, SIZES)


def test_splits_are_disjoint_and_test_does_not_depend_on_train_size() -> None:
    splits = generate_splits(0, {"train": 200, "val": 30, "test": 50})
    captions = {name: {s.caption for s in scenes} for name, scenes in splits.items()}
    assert [len(captions[n]) for n in ("train", "val", "test")] == [200, 30, 50]
    assert not captions["train"] & captions["test"]
    assert not captions["train"] & captions["val"]
    assert not captions["val"] & captions["test"]
    assert generate_splits(0, {"train": 10, "test": 50})["test"] == splits["test"]
    with pytest.raises(ConfigError, match="distinct scenes"):
        generate_splits(0, {"train": 100}, SceneConfig(max_objects=1, colours=("red",)))


def _read_objects(path: Path) -> list[tuple[str, str, str]]:
    """What is really drawn, from the pixels: (shape, colour, position) for each region holding colour."""
    image = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"))).int()
    cell = image.shape[0] / 3
    saturated = (image.max(-1).values - image.min(-1).values) > 60
    cells = {"left": (0, 1), "top": (1, 0), "center": (1, 1), "bottom": (1, 2), "right": (2, 1)}
    found = []
    for position in POSITIONS:
        col, row = cells[position]
        rows = slice(round(row * cell), round((row + 1) * cell))
        cols = slice(round(col * cell), round((col + 1) * cell))
        mask = saturated[rows, cols]
        if not mask.any():
            continue
        ys, xs = mask.nonzero(as_tuple=True)
        fill = mask.sum().item() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)).item()
        shape = "triangle" if fill < 0.65 else "circle" if fill < 0.9 else "square"
        mean = image[rows, cols][mask].float().mean(0)
        colour = min(COLOURS, key=lambda c: (torch.tensor(COLOURS[c]).float() - mean).norm().item())
        found.append((shape, colour, position))
    return found


def test_answers_match_what_was_drawn(scenes_dir: Path) -> None:
    examples = [e for split in SIZES for e in read_image_jsonl(scenes_dir / f"{split}.jsonl")]
    assert {e.type for e in examples} == {"caption", "colour", "count", "position"}
    for example in examples:
        drawn = _read_objects(example.image)
        if example.type == "caption":
            phrases = re.split(r", | and ", example.answer)
            assert len(phrases) == len(drawn)
            for phrase, (shape, colour, position) in zip(phrases, drawn, strict=True):
                assert phrase.startswith(f"a {colour} {shape} ") and phrase.endswith(position)
            continue
        shape = re.search(r"(circle|square|triangle)", example.prompt).group(1)  # type: ignore[union-attr]
        of_shape = [obj for obj in drawn if obj[0] == shape]
        if example.type == "count":
            assert example.answer == str(len(of_shape))
        else:
            assert len(of_shape) == 1
            expected = of_shape[0][1] if example.type == "colour" else of_shape[0][2]
            assert example.answer == expected


def test_answers_normalise_for_exact_match() -> None:
    assert exact_match("Two.", "2") and exact_match("The centre", "center") and exact_match("RED!", "red")
    assert not exact_match("red circle", "red")
    assert normalise_answer("A blue square\nat the top") == "blue square"


def test_encoder_gives_tokens_and_no_gradient_while_the_projector_gets_one(encoder: VisionEncoder) -> None:
    config = SceneConfig()
    images = [draw_scene(s, 96) for s in generate_splits(1, {"test": 2}, config)["test"]]
    tokens = encoder.encode(images)
    assert tokens.shape == (2, 9, 1280) and num_image_tokens(224) == 49
    assert encoder.feature_map(preprocess(images)).shape == (2, 1280, 3, 3)
    encoder.train()
    assert not encoder.training and not encoder.backbone.training
    projector = Projector(d_model=64, out_scale=0.5)
    out = projector(tokens)
    assert out.shape == (2, 9, 64)
    out.pow(2).sum().backward()
    assert all(not p.requires_grad and p.grad is None for p in encoder.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projector.parameters())
    assert projector.num_parameters() == 1280 * 64 + 64 + 64 * 64 + 64 + 2 * 64
    assert encoder.num_parameters() == sum(p.numel() for p in encoder.parameters())
    assert abs(out.detach().pow(2).mean().sqrt().item() - 0.5) < 0.05
    assert embedding_rms(torch.full((3, 4), 2.0)) == pytest.approx(2.0)
    with pytest.raises(ConfigError, match="multiple of 32"):
        check_image_size(100)


def test_cache_returns_identical_features_without_recomputing(
    encoder: VisionEncoder, scenes_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = [scenes_dir / "images" / "test-00000.png", scenes_dir / "images" / "test-00001.png"]
    cache = FeatureCache(encoder, tmp_path / "cache")
    first = cache.tokens([*paths, paths[0]])[:2]  # the same image twice in one call: encoded once
    assert first.shape == (2, 9, 1280) and cache.computed == 2 and cache.hits == 1
    assert torch.allclose(first[0], encoder.encode([Image.open(paths[0])])[0], atol=1e-5)

    def refuse(*args: object) -> torch.Tensor:
        raise AssertionError("the encoder ran on a cached image")

    monkeypatch.setattr(encoder, "encode", refuse)
    copy = tmp_path / "same-content.png"
    copy.write_bytes(paths[1].read_bytes())
    assert torch.equal(cache.tokens([*paths, copy]), torch.cat([first, first[1:]]))
    assert cache.computed == 2 and cache.hits == 4
    reloaded = FeatureCache(encoder, tmp_path / "cache")  # from disk, in a new process's cache
    assert torch.equal(reloaded.tokens(paths), first) and reloaded.computed == 0


def _one_line_error(call: object, *names: str) -> str:
    with pytest.raises(ConfigError) as info:
        call()  # type: ignore[operator]
    message = str(info.value)
    assert "\n" not in message
    for name in names:
        assert name in message
    return message


def test_bad_image_data_gets_one_line_naming_the_file(encoder: VisionEncoder, tmp_path: Path) -> None:
    good = tmp_path / "ok.png"
    Image.new("RGB", (8, 8)).save(good)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all\n\nreally")
    data = tmp_path / "data.jsonl"

    def rows(*items: dict) -> Path:
        data.write_text("\n".join(json.dumps(r) for r in items) + "\n")
        return data

    ok = {"image": "ok.png", "prompt": "What colour?", "answer": "red", "type": "colour"}
    assert read_image_jsonl(rows(ok))[0].image == good
    _one_line_error(lambda: read_image_jsonl(tmp_path / "nope.jsonl"), "nope.jsonl", "no such file")
    _one_line_error(
        lambda: read_image_jsonl(rows(ok, {"prompt": "x", "answer": "y"})), "data.jsonl:2", "no image"
    )
    _one_line_error(lambda: read_image_jsonl(rows({**ok, "image": "gone.png"})), "data.jsonl:1", "gone.png")
    _one_line_error(
        lambda: read_image_jsonl(rows({**ok, "image": "broken.png"})), "broken.png", "cannot be read"
    )
    data.write_text("{not json\n")
    _one_line_error(lambda: read_image_jsonl(data), "data.jsonl:1")
    cache = FeatureCache(encoder)
    _one_line_error(lambda: cache.tokens([broken]), "broken.png")
    _one_line_error(lambda: cache.tokens([tmp_path / "gone.png"]), "gone.png")
