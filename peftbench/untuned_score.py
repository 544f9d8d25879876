"""The untuned model's test score, measured once per study and reused by every run that shares it.

Greedy evaluation of the base model does not depend on the method (when the method starts from the base
function) nor on the seed, so a sweep of methods x seeds need not repeat it: the first run stores it under
`<results_dir>/<study>/untuned/<key>.json`, keyed by everything that can change it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from peftbench.files import atomic_write_json


def untuned_key(cfg: DictConfig, method: Any) -> str:
    """Hash of the model, task, precision and (for methods that change the base, e.g. a 4-bit base) method."""
    parts = {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "task": OmegaConf.to_container(cfg.task, resolve=True),
        "precision": str(cfg.trainer.precision),
        "limit_test_batches": cfg.trainer.limit_test_batches,
        "batch_size": cfg.batch_size,
        "method": None if method.identity_at_init else method.hyperparameters(),
    }
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def untuned_metrics(
    cfg: DictConfig, method: Any, evaluate: Callable[[], dict[str, float]]
) -> tuple[dict[str, float], bool]:
    """`(metrics, reused)`: the stored untuned metrics, or `evaluate()`'s result, stored for the next run."""
    path = Path(cfg.results_dir) / cfg.study / "untuned" / f"{untuned_key(cfg, method)}.json"
    if path.exists():
        try:
            return json.loads(path.read_text())["metrics"], True
        except (OSError, ValueError, KeyError):
            pass  # a damaged file is measured again and rewritten
    metrics = evaluate()
    atomic_write_json(path, {"metrics": metrics, "method": method.name, "seed": cfg.seed})
    return metrics, False
