"""`task=scenes`: answer questions about an image and describe it (the LLaVA recipe's two stages on
synthetic scenes; data: `peftbench.tasks.scenes_data`).

Data: seeded synthetic scenes (`scenes_seed`, `scenes: {train, val, test}` scene counts, disjoint by
content, the test split independent of the train size), drawn once into a cache directory
(`$PEFTBENCH_CACHE/scenes/<key>`, key = everything that changes the files); or `data=<file.jsonl>` (rows
of `image`, `prompt`, `answer`, optional `type`; images relative to the file), split by image (every
question about one image in one split; `split: {val, test, max_train}` count images), or `data=<dir>`
holding `train.jsonl`, `val.jsonl`, `test.jsonl`. Every image is checked before training: a missing or
unreadable image, or a row without one, is a one-line ConfigError naming the file.

Examples: the prompt as a user turn of the chat template, the answer + EOS as the target; the batch carries
each example's image path and the image model turns it into image tokens (cached per image). `train_types`
restricts what trains (stage 1: `[caption]`); val/test always hold every type in `question_types`.

Metrics (greedy answers): `exact_match/<type>` (x 100, after `normalise_answer`) for colour, count,
position (and any other type of a JSONL), `rouge_l/caption` (F x 100, first line), and the primary `score`:
the mean over the question types of their exact match (captions not included: their ROUGE-L is beside it;
with captions only, `score` is their ROUGE-L).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from peftbench.errors import ConfigError
from peftbench.tasks.base import Batch
from peftbench.tasks.checks import positive_int, require_eos
from peftbench.tasks.collate import CausalLMCollator, Encoded, pad_token_id, render_prompt
from peftbench.tasks.datatask import Collate, DataTask
from peftbench.tasks.rouge import rouge_scores
from peftbench.tasks.scenes_data import (
    QUESTION_TYPES,
    ImageExample,
    SceneConfig,
    exact_match,
    read_image_jsonl,
    write_scenes,
)
from peftbench.tasks.splits import split_records

log = logging.getLogger(__name__)

CAPTION = "caption"
SPLIT_FILES = ("train", "val", "test")


@dataclass
class ImageEncoded(Encoded):
    """A tokenized example with its image file and question type."""

    image: str = ""
    kind: str = "answer"


class ImageCollator(CausalLMCollator):
    """`CausalLMCollator` plus `images` (file paths) and `types`."""

    def __call__(self, examples: Sequence[Encoded]) -> dict[str, Any]:
        batch = super().__call__(examples)
        batch["images"] = [getattr(ex, "image", "") for ex in examples]
        batch["types"] = [getattr(ex, "kind", "answer") for ex in examples]
        return batch


def require_image_model(model: torch.nn.Module, task: str) -> None:
    """ConfigError unless `model` takes images (`takes_images`: model=vision_smollm2, a LLaVA directory)."""
    from peftbench.models.multimodal import takes_images

    if not takes_images(model):
        raise ConfigError(
            f"task={task!r} needs an image model; {type(model).__name__} takes no images; accepted: "
            "model=vision_smollm2 (or model.vision=..., or model.name_or_path=<a local LLaVA directory>)"
        )


def scenes_cache_root() -> Path:
    """`$PEFTBENCH_CACHE/scenes` (default ~/.cache/peftbench/scenes)."""
    base = os.environ.get("PEFTBENCH_CACHE") or "~/.cache/peftbench"
    return Path(base).expanduser() / "scenes"


def cached_scenes(seed: int, sizes: Mapping[str, int], config: SceneConfig, root: Path | None = None) -> Path:
    """The directory holding these scenes (`write_scenes`), written once: into a temporary directory
    renamed into place, so a reader never sees half of it."""
    key = json.dumps({"seed": seed, "sizes": dict(sizes), "config": asdict(config), "v": 1}, sort_keys=True)
    root = root or scenes_cache_root()
    final = root / hashlib.sha256(key.encode()).hexdigest()[:16]
    if (final / "test.jsonl").is_file():
        return final
    tmp = root / f".{final.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    write_scenes(tmp, seed, sizes, config)
    (tmp / "scenes.json").write_text(key + "\n")
    try:
        os.replace(tmp, final)
    except OSError:  # another process wrote it first
        shutil.rmtree(tmp, ignore_errors=True)
    return final


@dataclass(kw_only=True, eq=False)
class ScenesTask(DataTask):
    """Image question answering and captioning (see the module doc).

    Args (besides `DataTask`'s; `dataset`, `data_files`, `subset`, `hf_split` are not used here):
        data: a JSONL file of image paths + text, or a directory with train/val/test.jsonl; null: the
            synthetic scenes.
        scenes: scene counts `{train, val, test}` of the synthetic scenes.
        scenes_seed: their seed (not the run's: every run seed sees the same test scenes).
        canvas, shapes, colours, min_objects, max_objects: what a scene holds (`SceneConfig`).
        question_types: the types to use (caption, colour, count, position).
        train_types: the types trained on (null: all); val/test hold every type.
        max_target_tokens: the answer, EOS included.
        caption_new_tokens / answer_new_tokens: the generation budget of captions / of the other types.
        cache_dir: where the scenes are drawn (null: `$PEFTBENCH_CACHE/scenes`).
    """

    primary_metric: ClassVar[str] = "score"
    default_split: ClassVar[dict[str, Any]] = {"val": 16, "test": 48, "max_train": None}
    #: capability: the task's examples carry images (build.py checks it against the model's)
    takes_images: ClassVar[bool] = True

    name: str = "scenes"
    data: str | None = None
    scenes: Mapping[str, int] = field(default_factory=lambda: {"train": 300, "val": 16, "test": 48})
    scenes_seed: int = 0
    canvas: int = 96
    shapes: Sequence[str] | None = None
    colours: Sequence[str] | None = None
    min_objects: int = 1
    max_objects: int = 4
    question_types: Sequence[str] = QUESTION_TYPES
    train_types: Sequence[str] | None = None
    max_target_tokens: int = 40
    caption_new_tokens: int = 32
    answer_new_tokens: int = 4
    cache_dir: str | None = None
    eval_batch_size: int | None = 16
    probe: Mapping[str, Any] | bool | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("max_target_tokens", "caption_new_tokens", "answer_new_tokens"):
            positive_int(key, getattr(self, key))
        config = {"canvas": self.canvas, "min_objects": self.min_objects, "max_objects": self.max_objects}
        for key in ("shapes", "colours"):
            if getattr(self, key) is not None:
                config[key] = tuple(getattr(self, key))
        self.scene_config = SceneConfig(**config, question_types=tuple(self.question_types))
        self.question_types = list(self.question_types)
        self.train_types = list(self.train_types) if self.train_types is not None else None
        bad = [t for t in self.train_types or [] if t not in self.question_types]
        if bad:
            raise ConfigError(
                f"task.train_types={self.train_types} names {bad}; accepted: types among "
                f"{', '.join(self.question_types)}"
            )
        if not isinstance(self.scenes, Mapping) or set(self.scenes) - set(SPLIT_FILES):
            raise ConfigError(
                f"task.scenes={self.scenes!r} is not valid; accepted: {{train, val, test}} counts"
            )
        self._cache: tuple[Any, torch.Tensor, int] | None = None

    # ---- data -----------------------------------------------------------------------------------------
    def read_examples(self) -> dict[str, list[ImageExample]]:
        """The examples of each split (every image checked)."""
        if self.data is None:
            directory = cached_scenes(
                self.scenes_seed,
                {k: int(v) for k, v in self.scenes.items()},
                self.scene_config,
                Path(self.cache_dir).expanduser() if self.cache_dir else None,
            )
            return {part: read_image_jsonl(directory / f"{part}.jsonl") for part in SPLIT_FILES}
        path = Path(self.data).expanduser()
        if path.is_dir():
            missing = [p for p in SPLIT_FILES if not (path / f"{p}.jsonl").is_file()]
            if missing:
                raise ConfigError(
                    f"task.data={self.data!r}: no {missing[0]}.jsonl; accepted: a JSONL file, or a directory "
                    "holding train.jsonl, val.jsonl and test.jsonl"
                )
            return {part: read_image_jsonl(path / f"{part}.jsonl") for part in SPLIT_FILES}
        rows = read_image_jsonl(path)  # a ConfigError naming the file when it is missing
        by_image: dict[str, list[ImageExample]] = {}
        for row in rows:
            by_image.setdefault(str(row.image), []).append(row)
        groups = split_records(list(by_image.values()), key=lambda g: str(g[0].image), **self.split)
        return {
            "train": [ex for g in groups.train for ex in g],
            "val": [ex for g in groups.val for ex in g],
            "test": [ex for g in groups.test for ex in g],
        }

    def setup(self, tokenizer: Any, seed: int) -> None:
        """Read (or draw) the scenes, keep the types in use, tokenize; eval splits ordered by type (so
        that a batch holds one type and gets that type's generation budget)."""
        require_eos(tokenizer, self.name)
        self._tokenizer, self._seed = tokenizer, seed
        parts = self.read_examples()
        known = [
            *self.question_types,
            *sorted({e.type for p in parts.values() for e in p} - {*QUESTION_TYPES}),
        ]
        order = {kind: i for i, kind in enumerate(known)}
        for part, rows in parts.items():
            wanted = self.train_types if part == "train" and self.train_types is not None else known
            rows = [r for r in rows if r.type in wanted]
            if part != "train":
                rows = sorted(rows, key=lambda r: order[r.type])  # stable: scene order within a type
            self._data[part] = self._encode(rows)
        self.stats = {"images": len({e.image for p in self._data.values() for e in p}), **self.split_sizes()}
        if not self._data["test"]:
            raise ConfigError(f"task {self.name!r} has no test examples; accepted: a non-empty test split")
        log.info("%s: %s", self.name, self.stats)

    def _encode(self, rows: Sequence[ImageExample]) -> list[ImageEncoded]:
        tokenizer = self._tokenizer
        if not rows:
            return []
        rendered = [render_prompt(tokenizer, r.prompt) for r in rows]
        prompts = [
            tokenizer(text, add_special_tokens=not templated)["input_ids"] for text, templated in rendered
        ]
        targets = tokenizer([r.answer for r in rows], add_special_tokens=False)["input_ids"]
        eos = tokenizer.eos_token_id
        return [
            ImageEncoded(list(p), [*t[: self.max_target_tokens - 1], eos], r.answer, str(r.image), r.type)
            for p, t, r in zip(prompts, targets, rows, strict=True)
        ]

    def collator(self, train: bool) -> Collate:
        return ImageCollator(pad_token_id(self._tokenizer), for_generation=not train)

    # ---- model hooks, objective, metrics --------------------------------------------------------------
    def head(self, model: torch.nn.Module) -> torch.nn.Module | None:
        """No head of its own (the projector is the model's); refuses a model that takes no images."""
        require_image_model(model, self.name)
        return None

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
        """Mean cross-entropy over answer tokens (prompt, padding and image positions masked) and their
        count. In evaluation the batch's result is kept for `evaluate`."""
        if self._cache is not None and self._cache[0] is batch:
            return self._cache[1], self._cache[2]
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
            images=batch["images"],
        )
        n = int((batch["labels"][:, 1:] != -100).sum())
        if not torch.is_grad_enabled():
            self._cache = (batch, out.loss.detach(), n)
        return out.loss, n

    def answers(self, model: Any, batch: Batch) -> list[str]:
        """Greedy answers to the batch's prompts about its images (new tokens only, first line)."""
        captions = any(kind == CAPTION for kind in batch["types"])
        budget = self.caption_new_tokens if captions else self.answer_new_tokens
        prompt_ids = batch["gen_input_ids"]
        with torch.no_grad():
            out = model.generate(
                input_ids=prompt_ids,
                attention_mask=batch["gen_attention_mask"],
                images=batch["images"],
                max_new_tokens=budget,
                do_sample=False,
                pad_token_id=pad_token_id(self._tokenizer),
                eos_token_id=self._tokenizer.eos_token_id,
            )
        texts = self._tokenizer.batch_decode(out[:, prompt_ids.shape[1] :], skip_special_tokens=True)
        return [(text.strip().splitlines() or [""])[0].strip() for text in texts]

    def evaluate(self, model: torch.nn.Module, batch: Batch) -> dict[str, list[float]]:
        """Per example: `rouge_l/caption` or `exact_match/<type>`."""
        predictions = self.answers(model, batch)
        out: dict[str, list[float]] = {}
        for kind, prediction, reference in zip(batch["types"], predictions, batch["references"], strict=True):
            if kind == CAPTION:
                key, value = "rouge_l/caption", rouge_scores([prediction], [reference])["rouge_l"][0]
            else:
                key, value = f"exact_match/{kind}", 100.0 * exact_match(prediction, reference)
            out.setdefault(key, []).append(value)
        return out

    def aggregate(self, outputs: Mapping[str, Sequence[Any]]) -> dict[str, float]:
        """Per-type means and `score`, the mean over question types of their exact match."""
        metrics = super().aggregate(outputs)
        types = [v for k, v in metrics.items() if k.startswith("exact_match/")]
        if types:
            metrics["score"] = sum(types) / len(types)
        elif "rouge_l/caption" in metrics:  # captions only: their ROUGE-L is the score
            metrics["score"] = metrics["rouge_l/caption"]
        return metrics
