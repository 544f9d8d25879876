"""Merging several runs into one model: ``python -m peftbench.merge RUN_A RUN_B ... --how HOW --out DIR``.

docs/METHODS.md, "Merging several adapters". The runs' dense task vectors (`peftbench.merging.runs`: one
base, checked by fingerprint) are combined weight by weight, never their A and B factors separately
(`peftbench.merging.combine`: task arithmetic, arXiv 2212.04089; TIES, arXiv 2306.01708; DARE, arXiv
2311.03099, seeded), then either

- added to the base and saved as a plain transformers model (as the single-run merge saves one), or
- with ``--rank R``, factorised by truncated SVD into a rank-R LoRA (`peftbench.merging.low_rank`), whose
  relative Frobenius truncation error is printed and saved; changes no LoRA holds (norms, embeddings,
  biases, the head: full fine-tuning's, BitFit's) are dropped and their share of the change stated;
- ``--how cat``: plain LoRA-form runs (LoRA, rsLoRA, LoRA+, LoRA-FA, QLoRA) concatenated into one LoRA of
  rank ``sum_i r_i`` that computes the weighted sum exactly.

A LoRA comes out as a run-like directory (``adapter/adapter.safetensors`` and ``.hydra/config.yaml`` naming
the base) that `peftbench.generate`, `peftbench.evaluate`, `peftbench.export` and `peftbench.merge` accept.
Every output holds ``peftbench_merge.json``: the runs, how, weights, density, scale, seed and the base's
fingerprint. Bad input is one line (exit code 2), before any model is loaded where it can be.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from peftbench.errors import ConfigError, bad_value, is_int
from peftbench.merging.combine import COMBINATIONS, check_density, combine

HOWS = (*COMBINATIONS, "cat")
#: the combinations that take a density (TIES' trim, DARE's keep probability)
WITH_DENSITY = ("ties", "dare_linear", "dare_ties")
LORA_SCALING = 1.0  # the written LoRA's alpha / r (its factors absorb any other scaling)


@dataclass
class Plan:
    """What to merge and how, checked (`check_plan`) before anything is loaded."""

    runs: list[str]
    how: str
    weights: list[float]
    density: float | None = None
    scale: float = 1.0
    seed: int = 0
    rank: int | None = None
    model_overrides: list[str] = field(default_factory=list)


def check_plan(
    runs: list[str],
    how: str | None,
    weights: list[float] | None,
    density: float | None,
    scale: float,
    seed: int,
    rank: int | None,
    overrides: list[str] | None = None,
) -> Plan:
    """One-line ConfigError for a bad --how, --weights count, --density, --scale, --seed or --rank."""
    if how not in HOWS:
        raise bad_value("--how", how, HOWS)
    weights = [1.0] * len(runs) if weights is None else [float(w) for w in weights]
    if len(weights) != len(runs) or not all(math.isfinite(w) for w in weights):
        raise bad_value("--weights", weights, f"{len(runs)} finite numbers, one per run")
    if how in WITH_DENSITY:
        if density is None:
            raise ConfigError(f"--how {how} needs --density; accepted: a number in (0, 1]")
        check_density(density)
    elif density is not None:
        raise ConfigError(f"--density applies to {', '.join(WITH_DENSITY)}; not to --how {how}")
    if not math.isfinite(scale):
        raise bad_value("--scale", scale, "a finite number (lambda)")
    if not is_int(seed) or seed < 0:
        raise bad_value("--seed", seed, "an integer >= 0")
    if rank is not None:
        if how == "cat":
            raise ConfigError("--rank applies to the dense combinations; --how cat writes rank sum r_i")
        if not is_int(rank) or rank <= 0:
            raise bad_value("--rank", rank, "an integer > 0")
    return Plan(list(runs), how, weights, density, float(scale), seed, rank, list(overrides or []))


def provenance(plan: Plan, inputs: Any, **extra: Any) -> dict[str, Any]:
    return {
        "runs": [str(Path(s.adapter).resolve()) for s in inputs.saved],
        "methods": [m.hyperparameters() for m in inputs.methods],
        "how": plan.how,
        "weights": plan.weights,
        "density": plan.density,
        "scale": plan.scale,
        "seed": plan.seed,
        "rank": plan.rank,
        "base_fingerprint": inputs.base.fingerprint,
        "model_config": inputs.base.model_config,
        **extra,
    }


def removed_share(kept: dict[str, torch.Tensor], dropped: dict[str, torch.Tensor]) -> float:
    """The Frobenius norm of `dropped` over that of everything (0.0 for an all-zero change)."""
    lost = sum(float(t.double().square().sum()) for t in dropped.values())
    total = lost + sum(float(t.double().square().sum()) for t in kept.values())
    return math.sqrt(lost / total) if total > 0 else 0.0


def write_lora(
    out: Path, base: Any, config: dict[str, Any], state: dict[str, torch.Tensor], info: dict
) -> None:
    """A run-like directory holding the LoRA (`config`, `state`) on `base`: loaded onto a copy of the base
    first, so what is written is what peftbench loads."""
    from omegaconf import OmegaConf

    from peftbench.files import atomic_directory
    from peftbench.merged_output import PROVENANCE
    from peftbench.methods import build_method
    from peftbench.methods.io import save_adapter
    from peftbench.saved_run import ADAPTER_DIR, HYDRA_CONFIG

    model = copy.deepcopy(base.model)
    method = build_method(config)
    method.apply(model)
    method.load_adapter_state_dict(model, state)
    with atomic_directory(out, marker=PROVENANCE) as tmp:
        save_adapter(model, method, tmp / ADAPTER_DIR)
        (tmp / HYDRA_CONFIG).parent.mkdir(parents=True)
        OmegaConf.save(OmegaConf.create({"model": base.model_config}), tmp / HYDRA_CONFIG)
        (tmp / PROVENANCE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def merge_several(plan: Plan, out: Path) -> dict[str, Any]:
    """Load, combine and write as `plan` says; returns the provenance written."""
    from peftbench.merged_output import PROVENANCE, save_merged
    from peftbench.merging.low_rank import cat, factorise, linear_weight_names, to_lora
    from peftbench.merging.runs import load_inputs
    from peftbench.merging.task_vectors import add_to_base

    inputs = load_inputs(plan.runs, plan.model_overrides, cat=plan.how == "cat")
    base = inputs.base
    if plan.how == "cat":
        weights = [plan.scale * w for w in plan.weights]
        config, state = to_lora(cat(inputs.factors, weights, scaling=LORA_SCALING))
        info = provenance(plan, inputs, kind="lora", lora_rank=config["r"])
        write_lora(out, base, config, state, info)
        print(f"wrote {out}: a rank-{config['r']} LoRA (cat of {len(plan.runs)} runs, exact)")
        return info
    merged = combine(
        plan.how,
        [v.deltas for v in inputs.vectors],
        plan.weights,
        density=plan.density if plan.density is not None else 1.0,
        scale=plan.scale,
        seed=plan.seed,
    )
    if plan.rank is not None:
        result = factorise(merged, plan.rank, linear_weight_names(base.model), scaling=LORA_SCALING)
        dropped = {n: t for n, t in result.remainder.items() if t.any()}
        share = removed_share({n: merged[n] for n in result.factors}, dropped)
        info = provenance(
            plan,
            inputs,
            kind="lora",
            lora_rank=plan.rank,
            truncation_error=result.error,
            dropped_tensors=sorted(dropped),
            dropped_share=share,
        )
        config, state = to_lora(result.factors)
        write_lora(out, base, config, state, info)
        print(
            f"wrote {out}: a rank-{plan.rank} LoRA; truncation error (relative Frobenius, linear layers) "
            f"{result.error:.6f}"
            + (
                f"; dropped {len(dropped)} changes no LoRA holds (norms, embeddings, biases): "
                f"{share:.6f} of the merged change's norm"
                if dropped
                else ""
            )
        )
        return info
    from peftbench.models import ModelSpec

    model = add_to_base(base.model, merged)
    model.to(ModelSpec.from_config(base.model_config).torch_dtype)
    info = provenance(plan, inputs, kind="model")
    save_merged(model, base.tokenizer, out, info)
    assert (out / PROVENANCE).is_file()
    print(f"wrote {out}: {plan.how} of {len(plan.runs)} runs added to the base")
    return info
