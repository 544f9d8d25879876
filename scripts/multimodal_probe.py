"""Feasibility probe: do the frozen EfficientNet-Lite0 features tell what a scene question asks, linearly?

A multinomial logistic regression (scikit-learn's if installed, else the same model fitted with torch's
L-BFGS) is trained on a few hundred synthetic scenes (peftbench/tasks/scenes_data.py) and scored on
held-out ones, for four inputs: the encoder's tokens mean-pooled (1280 numbers), the encoder's tokens
concatenated (9 x 1280 at 96 px, position kept), the raw preprocessed pixels (96 x 96 x 3), and, as a
control, the mean-pooled tokens of the same architecture with random weights (what ImageNet adds). The L2
strength is chosen on a fifth of the training scenes. Questions:

- colour (single shape): one shape, three colours, chance 1/3;
- colour of the circle: exactly one circle among 1-3 other objects (distractors), three colours;
- position of the circle: same scenes, five regions, chance 1/5.

The encoder is ImageNet-trained, not language-aligned: this measures what its features hold, not what a
language model can read from them. Results are printed and written to
experiments/multimodal_probe/probe.json. Usage: `.venv/bin/python scripts/multimodal_probe.py [--train 300]`
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch

from peftbench.hardware import cpu_model
from peftbench.models.vision import DEFAULT_IMAGE_SIZE, VisionEncoder, preprocess
from peftbench.tasks.scenes_data import Scene, SceneConfig, draw_scene, sample_scene

OUT = Path(__file__).resolve().parents[1] / "experiments" / "multimodal_probe" / "probe.json"
COLOURS = ("red", "green", "blue")
L2_GRID = (1e-3, 1e-2, 1e-1, 1.0)


def scenes(
    seed: int, n: int, config: SceneConfig, keep: Callable[[Scene], bool], unique: bool
) -> list[Scene]:
    """`n` scenes that `keep` accepts; with `unique`, no two share content (their caption)."""
    rng, out, seen = random.Random(seed), [], set()
    while len(out) < n:
        scene = sample_scene(rng, config)
        if keep(scene) and not (unique and scene.caption in seen):
            seen.add(scene.caption)
            out.append(scene)
    return out


def fit_predict(
    x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, l2: float
) -> torch.Tensor:
    """Multinomial logistic regression on standardised inputs; predicted labels of `x_test`."""
    mean, std = x_train.mean(0), x_train.std(0).clamp(min=1e-6)
    a, b = (x_train - mean) / std, (x_test - mean) / std
    classes = int(y_train.max()) + 1
    try:
        from sklearn.linear_model import LogisticRegression

        model = LogisticRegression(C=1.0 / (l2 * len(a)), max_iter=500).fit(a.numpy(), y_train.numpy())
        return torch.from_numpy(model.predict(b.numpy()))
    except ImportError:
        pass
    weight = torch.zeros(a.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(a @ weight + bias, y_train) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return (b @ weight + bias).argmax(1).detach()


def probe(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor) -> dict:
    """Choose L2 on the last fifth of the training set, refit on all of it, score on the test set."""
    cut = len(x_train) * 4 // 5
    val_acc = {
        l2: (fit_predict(x_train[:cut], y_train[:cut], x_train[cut:], l2) == y_train[cut:])
        .float()
        .mean()
        .item()
        for l2 in L2_GRID
    }
    best = max(L2_GRID, key=lambda l2: (val_acc[l2], l2))
    test_acc = (fit_predict(x_train, y_train, x_test, best) == y_test).float().mean().item()
    return {"test_accuracy": round(test_acc, 4), "l2": best, "val_accuracy": round(val_acc[best], 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=300)
    parser.add_argument("--test", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    encoder = VisionEncoder(DEFAULT_IMAGE_SIZE)
    random_encoder = VisionEncoder(DEFAULT_IMAGE_SIZE, pretrained=False)  # control: the architecture alone
    n = args.train + args.test
    single = scenes(args.seed, n, SceneConfig(colours=COLOURS, max_objects=1), lambda s: True, unique=False)
    crowded = scenes(
        args.seed + 1,
        n,
        SceneConfig(colours=COLOURS, min_objects=2, max_objects=4),
        lambda s: s.only("circle") is not None,
        unique=True,
    )
    circle = [s.only("circle") for s in crowded]
    tasks = {
        "colour_single_shape": (single, [COLOURS.index(s.objects[0].colour) for s in single], 3),
        "colour_of_circle_with_distractors": (crowded, [COLOURS.index(o.colour) for o in circle], 3),
        "position_of_circle_with_distractors": (
            crowded,
            [("left", "top", "center", "bottom", "right").index(o.position) for o in circle],
            5,
        ),
    }
    inputs: dict[int, dict[str, torch.Tensor]] = {}
    for group in (single, crowded):
        pixels = preprocess([draw_scene(s, 96) for s in group], DEFAULT_IMAGE_SIZE)
        tokens = torch.cat([encoder(pixels[i : i + 64]) for i in range(0, len(pixels), 64)])
        inputs[id(group)] = {
            "encoder_mean_pooled": tokens.mean(1),
            "encoder_tokens_concatenated": tokens.flatten(1),
            "raw_pixels": pixels.flatten(1),
            "random_weights_encoder_mean_pooled": torch.cat(
                [random_encoder(pixels[i : i + 64]) for i in range(0, len(pixels), 64)]
            ).mean(1),
        }
    results: dict[str, dict] = {}
    for name, (group, labels, classes) in tasks.items():
        y = torch.tensor(labels)
        results[name] = {"classes": classes, "chance": round(1 / classes, 4)}
        for feature, x in inputs[id(group)].items():
            tr, te = slice(0, args.train), slice(args.train, n)
            results[name][feature] = probe(x[tr], y[tr], x[te], y[te])
    try:
        import sklearn  # noqa: F401

        classifier = "sklearn LogisticRegression"
    except ImportError:
        classifier = "torch multinomial logistic regression, L-BFGS (sklearn not installed)"
    record = {
        "what": "linear probe: frozen EfficientNet-Lite0 (ImageNet-trained, not language-aligned) vs pixels",
        "encoder": encoder.fingerprint,
        "image_size": DEFAULT_IMAGE_SIZE,
        "train_scenes": args.train,
        "test_scenes": args.test,
        "seed": args.seed,
        "classifier": classifier,
        "l2_grid": list(L2_GRID),
        "note": "colour_single_shape draws from 45 possible contents, so test scenes repeat train contents "
        "with other jitter; the distractor scenes are disjoint by content",
        "results": results,
        "cpu": cpu_model(),
        "threads": args.threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "seconds": round(time.perf_counter() - start, 1),
        "command": "python scripts/multimodal_probe.py "
        f"--train {args.train} --test {args.test} --seed {args.seed} --threads {args.threads}",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    for name, res in results.items():
        row = ", ".join(f"{k} {v['test_accuracy']:.3f}" for k, v in res.items() if isinstance(v, dict))
        print(f"{name} (chance {res['chance']:.2f}): {row}")
    print(f"cpu: {record['cpu']}; {record['seconds']} s; written to {args.out}")


if __name__ == "__main__":
    main()
