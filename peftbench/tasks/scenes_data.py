"""Synthetic scenes for image question answering: seeded, drawn with PIL, with a caption and questions.

A scene is one to four objects (circle, square, triangle; red, green, blue, yellow by default), each in its
own region of a 3 x 3 grid: left, center, right, top or bottom. The objects a question is not about are its
distractors. Each scene gives up to four examples:

- caption: "Describe the image." -> "a red circle on the left and a blue square at the top" (ROUGE-L);
- colour: "What colour is the circle?" (asked only about a shape present exactly once);
- count: "How many squares are there?" -> "0" to "4";
- position: "Where is the triangle?" -> left / center / right / top / bottom (a shape present once).

Answers are compared after `normalise_answer` (exact match per question type).

Splits are deterministic and disjoint: each split draws from its own random stream (seed, split name), in
the order test, val, train, and a scene whose content (its caption) already belongs to an earlier split is
skipped, so no two splits share a scene and the test split does not depend on the train size. Sizes and
jitter make each image unique; the content decides disjointness.

`write_scenes` writes the PNG images and one JSONL per split (`image`, `prompt`, `answer`, `type`,
`scene_id`; image paths relative to the JSONL file); `read_image_jsonl` reads such a file, or a user's,
and rejects a row without an image, or a missing or unreadable image, in one line that names the file.
"""

from __future__ import annotations

import json
import random
import re
import string
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

from peftbench.errors import ConfigError

SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
}
POSITIONS = ("left", "top", "center", "bottom", "right")  # the caption lists objects in this order
QUESTION_TYPES = ("caption", "colour", "count", "position")
SPLITS = ("test", "val", "train")  # generation order: earlier splits keep their scenes

_WHERE = {
    "left": "on the left",
    "top": "at the top",
    "center": "in the center",
    "bottom": "at the bottom",
    "right": "on the right",
}
_CELL = {"left": (0, 1), "top": (1, 0), "center": (1, 1), "bottom": (1, 2), "right": (2, 1)}  # (col, row)
_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_SPELLING = {"centre": "center", "colour": "color", "grey": "gray"}


@dataclass(frozen=True)
class SceneConfig:
    """What scenes may contain; `canvas` is the image side in pixels."""

    canvas: int = 96
    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = tuple(COLOURS)
    min_objects: int = 1
    max_objects: int = 4
    question_types: tuple[str, ...] = QUESTION_TYPES

    def __post_init__(self) -> None:
        for what, values, known in (
            ("shapes", self.shapes, SHAPES),
            ("colours", self.colours, tuple(COLOURS)),
            ("question_types", self.question_types, QUESTION_TYPES),
        ):
            bad = [v for v in values if v not in known] or ([] if values else ["(none)"])
            if bad:
                raise ConfigError(
                    f"scenes {what}={list(values)!r} is not valid; accepted: {', '.join(known)}"
                )
        if not 1 <= self.min_objects <= self.max_objects <= len(POSITIONS):
            raise ConfigError(
                f"scenes min_objects={self.min_objects}, max_objects={self.max_objects} are not valid; "
                f"accepted: 1 <= min_objects <= max_objects <= {len(POSITIONS)}"
            )
        if self.canvas < 48:
            raise ConfigError(f"scenes canvas={self.canvas} is not valid; accepted: an integer >= 48")


@dataclass(frozen=True)
class SceneObject:
    """One shape of one colour in one region."""

    shape: str
    colour: str
    position: str


@dataclass(frozen=True)
class Scene:
    """The content of a scene (objects sorted by region) and the seed of its drawing's jitter."""

    objects: tuple[SceneObject, ...]
    draw_seed: int

    def count(self, shape: str) -> int:
        """How many objects have this shape."""
        return sum(obj.shape == shape for obj in self.objects)

    def only(self, shape: str) -> SceneObject | None:
        """The object of this shape if there is exactly one, else None."""
        found = [obj for obj in self.objects if obj.shape == shape]
        return found[0] if len(found) == 1 else None

    @property
    def caption(self) -> str:
        """One sentence listing every object, left to right then top to bottom (the scene's content key)."""
        phrases = [f"a {obj.colour} {obj.shape} {_WHERE[obj.position]}" for obj in self.objects]
        return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


@dataclass(frozen=True)
class ImageExample:
    """One image with a prompt and its reference answer; `type` is the question type (the metric group)."""

    image: Path
    prompt: str
    answer: str
    type: str
    scene_id: str = ""
    extra: dict[str, object] = field(default_factory=dict, compare=False)


def sample_scene(rng: random.Random, config: SceneConfig) -> Scene:
    """A random scene: between min_objects and max_objects objects, each in a different region."""
    n = rng.randint(config.min_objects, config.max_objects)
    positions = sorted(rng.sample(POSITIONS, n), key=POSITIONS.index)
    objects = tuple(SceneObject(rng.choice(config.shapes), rng.choice(config.colours), p) for p in positions)
    return Scene(objects, rng.getrandbits(32))


def draw_scene(scene: Scene, canvas: int = 96) -> Image.Image:
    """The scene as an RGB image: a light, slightly tinted background; each object jittered in size,
    position and shade (seeded by `scene.draw_seed`, so the same scene always gives the same pixels)."""
    rng = random.Random(scene.draw_seed)
    grey = rng.randint(215, 250)
    background = tuple(min(255, grey + rng.randint(-6, 6)) for _ in range(3))
    image = Image.new("RGB", (canvas, canvas), background)
    draw = ImageDraw.Draw(image)
    cell = canvas / 3
    for obj in scene.objects:
        col, row = _CELL[obj.position]
        radius = cell * rng.uniform(0.28, 0.40)
        slack = cell / 2 - radius
        cx = (col + 0.5) * cell + rng.uniform(-slack, slack) * 0.8
        cy = (row + 0.5) * cell + rng.uniform(-slack, slack) * 0.8
        fill = tuple(max(0, min(255, c + rng.randint(-12, 12))) for c in COLOURS[obj.colour])
        if obj.shape == "circle":
            draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
        elif obj.shape == "square":
            half = radius * 0.85
            draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
        else:
            draw.polygon(
                [(cx, cy - radius), (cx - radius, cy + radius * 0.8), (cx + radius, cy + radius * 0.8)],
                fill=fill,
            )
    return image


def scene_questions(scene: Scene, rng: random.Random, config: SceneConfig) -> list[tuple[str, str, str]]:
    """`(type, prompt, answer)` for each question type in the config that this scene can answer."""
    out: list[tuple[str, str, str]] = []
    unique = [shape for shape in config.shapes if scene.only(shape) is not None]
    for qtype in config.question_types:
        if qtype == "caption":
            out.append((qtype, "Describe the image.", scene.caption))
        elif qtype == "count":
            shape = rng.choice(config.shapes)
            out.append((qtype, f"How many {shape}s are there?", str(scene.count(shape))))
        elif unique:
            target = scene.only(rng.choice(unique))
            assert target is not None
            if qtype == "colour":
                out.append((qtype, f"What colour is the {target.shape}?", target.colour))
            else:
                out.append((qtype, f"Where is the {target.shape}?", target.position))
    return out


def generate_splits(
    seed: int, sizes: Mapping[str, int], config: SceneConfig | None = None
) -> dict[str, list[Scene]]:
    """`sizes[split]` scenes for each split in `sizes` (names from test, val, train), disjoint by content.

    A ConfigError if the config cannot give that many distinct scenes.
    """
    config = config or SceneConfig()
    unknown = [name for name in sizes if name not in SPLITS]
    if unknown:
        raise ConfigError(f"scenes split {unknown[0]!r} is not valid; accepted: {', '.join(SPLITS)}")
    for name, n in sizes.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ConfigError(f"scenes {name} size={n!r} is not valid; accepted: an integer >= 0")
    seen: set[str] = set()
    out: dict[str, list[Scene]] = {}
    for split in SPLITS:
        if split not in sizes:
            continue
        rng = random.Random(f"scenes-{seed}-{split}")
        scenes: list[Scene] = []
        budget = 50 * sizes[split] + 1000
        while len(scenes) < sizes[split]:
            budget -= 1
            if budget < 0:
                raise ConfigError(
                    f"scenes: only {len(seen)} distinct scenes found for {dict(sizes)}; ask for fewer "
                    "or allow more objects, shapes or colours"
                )
            scene = sample_scene(rng, config)
            if scene.caption not in seen:
                seen.add(scene.caption)
                scenes.append(scene)
        out[split] = scenes
    return out


def write_scenes(
    directory: str | Path, seed: int, sizes: Mapping[str, int], config: SceneConfig | None = None
) -> dict[str, Path]:
    """Draw the splits into `directory/images/<split>-<i>.png` and write `directory/<split>.jsonl`.

    Returns the JSONL path of each split. The same seed, sizes and config give byte-identical files.
    """
    config = config or SceneConfig()
    root = Path(directory)
    (root / "images").mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for split, scenes in generate_splits(seed, sizes, config).items():
        rng = random.Random(f"questions-{seed}-{split}")
        lines = []
        for i, scene in enumerate(scenes):
            scene_id = f"{split}-{i:05d}"
            rel = f"images/{scene_id}.png"
            draw_scene(scene, config.canvas).save(root / rel, optimize=False)
            for qtype, prompt, answer in scene_questions(scene, rng, config):
                row = {"image": rel, "prompt": prompt, "answer": answer, "type": qtype, "scene_id": scene_id}
                lines.append(json.dumps(row))
        paths[split] = root / f"{split}.jsonl"
        paths[split].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return paths


def read_image_jsonl(
    path: str | Path,
    image_key: str = "image",
    prompt_key: str = "prompt",
    answer_key: str = "answer",
    type_key: str = "type",
    check_images: bool = True,
) -> list[ImageExample]:
    """Examples from a JSONL file of image paths and text; relative image paths are taken from the file's
    folder. A row without a type gets `"answer"`. Bad input raises a one-line ConfigError naming the file
    (and the image): a missing file, a bad line, a row without an image, prompt or answer, and, with
    `check_images`, a missing or unreadable image."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"image data {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"image data {path} cannot be read: {_one_line(err)}") from None
    examples: list[ImageExample] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{where}: not a JSON object ({err.msg})") from None
        if not isinstance(row, dict):
            raise ConfigError(f"{where}: not a JSON object")
        if not isinstance(row.get(image_key), str) or not row[image_key].strip():
            raise ConfigError(f"{where}: the row has no image (expected a path in {image_key!r})")
        for key in (prompt_key, answer_key):
            if not isinstance(row.get(key), str):
                raise ConfigError(f"{where}: the row has no {key!r} text")
        image = Path(row[image_key])
        image = image if image.is_absolute() else path.parent / image
        if check_images:
            check_image(image, where)
        extra = {k: v for k, v in row.items() if k not in (image_key, prompt_key, answer_key, type_key)}
        scene_id = str(extra.pop("scene_id", ""))
        qtype = str(row.get(type_key) or "answer")
        examples.append(ImageExample(image, row[prompt_key], row[answer_key], qtype, scene_id, extra))
    if not examples:
        raise ConfigError(f"image data {path}: no examples")
    return examples


def check_image(image: Path, where: str = "") -> None:
    """A one-line ConfigError naming `image` (and `where` it was named) if it is missing or not an image."""
    prefix = f"{where}: " if where else ""
    if not image.is_file():
        raise ConfigError(f"{prefix}image {image}: no such file")
    try:
        with Image.open(image) as img:
            img.verify()
    except Exception as err:
        raise ConfigError(f"{prefix}image {image} cannot be read: {_one_line(err)}") from None


def normalise_answer(text: str) -> str:
    """First line, lower case, punctuation and articles dropped, number words as digits, one spelling
    (centre -> center, colour -> color, grey -> gray): "Two." and "2" normalise alike."""
    first = (text.strip().splitlines() or [""])[0]
    words = _PUNCT.sub(" ", first.lower()).split()
    words = [_SPELLING.get(w, w) for w in words if w not in ("a", "an", "the")]
    return " ".join(str(_NUMBERS.index(w)) if w in _NUMBERS else w for w in words)


def exact_match(prediction: str, reference: str) -> bool:
    """Whether the normalised prediction equals the normalised reference."""
    return normalise_answer(prediction) == normalise_answer(reference)


def example_record(example: ImageExample) -> dict[str, object]:
    """An example as a JSON-ready dict (the JSONL row format)."""
    row = asdict(example)
    row["image"] = str(example.image)
    extra = row.pop("extra")
    return {**row, **extra}


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__
