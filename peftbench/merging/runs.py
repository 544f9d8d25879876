"""Saved runs as merge inputs: each run's base rebuilt from its own config, fingerprinted, and its task vector
(or, for ``cat``, its LoRA factors) taken relative to that base.

docs/METHODS.md, "Merging several adapters". The runs must share one base model, checked by
`base_fingerprint` (the weights' values), not by name: two runs whose configs name the base differently (a
moved directory) merge, two runs on one name whose weights differ (another revision, another random seed) are
refused. Every method is checked from its adapter file's metadata before any model is loaded, so a run without
a task vector (prompt/prefix tuning, bottleneck adapters) is refused in one line at once.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from peftbench.errors import ConfigError
from peftbench.merging.low_rank import CAT_METHODS, LowRank, lora_factors
from peftbench.merging.task_vectors import (
    TaskVector,
    base_fingerprint,
    check_method,
    check_same_base,
    task_vector_from_adapter,
)
from peftbench.saved_run import SavedRun, locate


@dataclass
class LoadedBase:
    """A base model rebuilt from a run's `model` config (left as loaded), its tokenizer and fingerprint."""

    model: nn.Module
    tokenizer: Any
    fingerprint: str
    model_config: dict[str, Any]


@dataclass
class MergeInputs:
    """The runs to merge: where each is, its method, the shared base and (per run) what is merged."""

    labels: list[str]
    saved: list[SavedRun]
    methods: list[Any]
    base: LoadedBase
    #: the dense task vectors (every `how` but cat)
    vectors: list[TaskVector]
    #: the LoRA factors (how=cat)
    factors: list[dict[str, LowRank]]


def check_cat(method: Any) -> None:
    """One-line ConfigError for a method whose layers are not plain ``W0 + s B A`` (checked again on the
    loaded layers by `lora_factors`)."""
    if method.name not in CAT_METHODS:
        raise ConfigError(
            f"how=cat needs plain LoRA-form runs (W0 + s B A on the original base); method={method.name!r} "
            f"is not one; accepted: {', '.join(CAT_METHODS)} (rsLoRA too)"
        )


def load_base(model_config: dict[str, Any]) -> LoadedBase:
    from peftbench.models import load_model

    model, tokenizer = load_model(model_config)
    model.eval().requires_grad_(False)
    return LoadedBase(model, tokenizer, base_fingerprint(model), model_config)


def _key(model_config: dict[str, Any]) -> str:
    return json.dumps(model_config, sort_keys=True, default=str)


def load_inputs(paths: Sequence[str | Path], overrides: Sequence[str] = (), cat: bool = False) -> MergeInputs:
    """Locate every run, check its method (a task vector; LoRA form for `cat`), rebuild each distinct base
    once, check they are one base (fingerprint) and take each run's task vector (or LoRA factors)."""
    from peftbench.methods.io import load_adapter, read_method

    labels = [str(p) for p in paths]
    saved = [locate(p, overrides) for p in paths]
    methods = [read_method(s.adapter) for s in saved]
    for method in methods:  # before any model is loaded
        check_method(method)
        if cat:
            check_cat(method)
    bases: dict[str, LoadedBase] = {}
    for run in saved:
        key = _key(run.model_config)
        if key not in bases:
            bases[key] = load_base(run.model_config)
    per_run = [bases[_key(run.model_config)] for run in saved]
    fingerprints = [TaskVector(m.name, b.fingerprint, {}) for m, b in zip(methods, per_run, strict=True)]
    check_same_base(fingerprints, labels)
    base = per_run[0]
    vectors: list[TaskVector] = []
    factors: list[dict[str, LowRank]] = []
    for run, own in zip(saved, per_run, strict=True):
        if cat:
            adapted = copy.deepcopy(own.model)
            method = load_adapter(adapted, run.adapter)
            factors.append(lora_factors(adapted.eval(), method))
            del adapted
        else:
            vectors.append(task_vector_from_adapter(own.model, run.adapter, own.fingerprint))
    return MergeInputs(labels, saved, methods, base, vectors, factors)
