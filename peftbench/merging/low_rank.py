"""From dense task vectors back to a LoRA: truncated SVD, and ``cat`` of plain LoRA-form adapters.

- Truncated SVD (Eckart-Young): the best rank-R approximation of a merged change ``delta = U S V^T`` in
  Frobenius norm is ``U_R S_R V_R^T``; as a LoRA with scaling s, ``B = U_R (S_R / s)^1/2`` and
  ``A = (S_R / s)^1/2 V_R^T`` (balanced, as PiSSA's factors, arXiv 2404.02948), and the relative truncation
  error is ``||delta - s B A||_F / ||delta||_F = sqrt(sum_{i>R} S_i^2 / sum_i S_i^2)``. HF PEFT's
  ``add_weighted_adapter`` offers the same for LoRA (its ``svd`` and ``*_svd`` combination types).
- ``cat`` (HF PEFT's ``combination_type="cat"``): for LoRA adapters on one base, stacking the factors,
  ``B_cat = [c_1 B_1, ..., c_n B_n]`` and ``A_cat = [A_1; ...; A_n]`` with ``c_i = w_i s_i / s``, gives
  ``s B_cat A_cat = sum_i w_i s_i B_i A_i`` exactly, at rank ``sum_i r_i``. Only plain LoRA-form adapters
  qualify (LoRA, rsLoRA, LoRA+, LoRA-FA, QLoRA): DoRA's magnitude, PiSSA's and Delta-LoRA's changed base
  are not a sum of ``s B A`` terms on the original base.
Every adapter here is keyed, like a task vector, by the base weight's name (``<layer>.weight``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from peftbench.errors import ConfigError, bad_value
from peftbench.methods.base import PeftMethod, adapter_layers
from peftbench.methods.lora import LoRALinear

#: the methods whose trained layers are plain ``W0 + s B A`` on the original base (rsLoRA: lora's flag)
CAT_METHODS = ("lora", "lora_fa", "lora_plus", "qlora")
WEIGHT_SUFFIX = ".weight"


@dataclasses.dataclass
class LowRank:
    """A low-rank change ``scaling * B @ A``: B (out, r), A (r, in), fp32."""

    B: torch.Tensor
    A: torch.Tensor
    scaling: float = 1.0

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def dense(self) -> torch.Tensor:
        return self.scaling * (self.B @ self.A)


@dataclasses.dataclass
class Factorised:
    """`factorise`'s result: rank-R factors of the 2-D linear weights' changes, each one's relative
    Frobenius truncation error, the error over all of them together, and the changes not factorised (biases,
    norms, embeddings: no LoRA holds them)."""

    factors: dict[str, LowRank]
    errors: dict[str, float]
    error: float
    remainder: dict[str, torch.Tensor]


def _check_rank(rank: int) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise bad_value("rank", rank, "an integer > 0")
    return rank


def _check_scaling(scaling: float) -> float:
    if isinstance(scaling, bool) or not isinstance(scaling, int | float) or not 0 < scaling < math.inf:
        raise bad_value("scaling", scaling, "a finite number > 0 (LoRA's alpha / r)")
    return float(scaling)


@torch.no_grad()
def truncated_svd(delta: torch.Tensor, rank: int, scaling: float = 1.0) -> tuple[LowRank, float]:
    """The best rank-`rank` approximation of the 2-D `delta` as a LoRA with `scaling` (zero-padded to
    `rank` where the matrix has fewer singular values), and its relative Frobenius truncation error (0.0 for
    a zero `delta`), computed from the singular values in fp32."""
    rank, scaling = _check_rank(rank), _check_scaling(scaling)
    if delta.dim() != 2:
        raise ConfigError(f"a LoRA holds a 2-D weight change; got shape {tuple(delta.shape)}")
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    kept = min(rank, s.numel())
    root = torch.sqrt(s[:kept] / scaling)
    lora_b = torch.zeros(delta.shape[0], rank, dtype=torch.float32, device=delta.device)
    lora_a = torch.zeros(rank, delta.shape[1], dtype=torch.float32, device=delta.device)
    lora_b[:, :kept] = u[:, :kept] * root[None, :]
    lora_a[:kept] = root[:, None] * vh[:kept]
    total = float(s.double().square().sum())
    error = math.sqrt(float(s[kept:].double().square().sum()) / total) if total > 0 else 0.0
    return LowRank(lora_b, lora_a, scaling), error


def linear_weight_names(model: nn.Module) -> set[str]:
    """``<layer>.weight`` of every linear layer a LoRA may adapt (`walker.linear_layer_names`: the blocks'
    linear layers, not the output head), in the plain base model."""
    from peftbench.methods.walker import linear_layer_names

    return {name + WEIGHT_SUFFIX for name in linear_layer_names(model)}


def factorise(
    deltas: Mapping[str, torch.Tensor], rank: int, linear: Collection[str], scaling: float = 1.0
) -> Factorised:
    """`truncated_svd` of every change in `deltas` whose name is in `linear` (`linear_weight_names`); the
    others are returned as the remainder. The overall error is ``sqrt(sum ||delta - s B A||^2 / sum
    ||delta||^2)`` over the factorised changes."""
    factors: dict[str, LowRank] = {}
    errors: dict[str, float] = {}
    remainder: dict[str, torch.Tensor] = {}
    lost = total = 0.0
    for name, delta in deltas.items():
        if name not in linear:
            remainder[name] = delta
            continue
        factors[name], errors[name] = truncated_svd(delta, rank, scaling)
        squared = float(delta.double().square().sum())
        total += squared
        lost += errors[name] ** 2 * squared
    return Factorised(factors, errors, math.sqrt(lost / total) if total > 0 else 0.0, remainder)


def _own_tensors(layer: nn.Module) -> set[str]:
    names = [n for n, _ in layer.named_parameters()] + [n for n, _ in layer.named_buffers()]
    return {n for n in names if not n.startswith("base.")}


def lora_factors(model: nn.Module, method: PeftMethod) -> dict[str, LowRank]:
    """The (B, A, s) of every layer of a plain LoRA-form adapter (`CAT_METHODS`), keyed ``<layer>.weight``,
    in fp32. One-line ConfigError for any other method (its layers hold more than A and B, or it changed the
    base)."""
    layers = dict(adapter_layers(model))
    plain = (
        not method.modifies_base
        and bool(layers)
        and all(
            isinstance(layer, LoRALinear) and _own_tensors(layer) == {"lora_A", "lora_B"}
            for layer in layers.values()
        )
    )
    if not plain:
        raise ConfigError(
            f"how=cat needs plain LoRA-form runs (W0 + s B A on the original base); method={method.name!r} "
            f"is not one; accepted: {', '.join(CAT_METHODS)} (rsLoRA too)"
        )
    return {
        name + WEIGHT_SUFFIX: LowRank(
            layer.lora_B.detach().float(), layer.lora_A.detach().float(), float(layer.scaling)
        )
        for name, layer in layers.items()
    }


@torch.no_grad()
def cat(
    adapters: Sequence[Mapping[str, LowRank]], weights: Sequence[float] | None = None, scaling: float = 1.0
) -> dict[str, LowRank]:
    """Concatenate LoRA adapters: per name ``B_cat = [c_1 B_1, ...]``, ``A_cat = [A_1; ...]`` with
    ``c_i = w_i s_i / scaling``, so that ``scaling B_cat A_cat = sum_i w_i s_i B_i A_i`` exactly. Every name
    gets rank ``sum_i r_i`` (``r_i``: adapter i's largest rank; zero blocks where it lacks the name or has
    a smaller rank there), so the result is one uniform-rank LoRA."""
    scaling = _check_scaling(scaling)
    if not adapters:
        raise ConfigError("no adapters to concatenate; accepted: one or more")
    weights = [1.0] * len(adapters) if weights is None else [float(w) for w in weights]
    if len(weights) != len(adapters) or not all(math.isfinite(w) for w in weights):
        raise bad_value("weights", weights, f"{len(adapters)} finite numbers, one per adapter")
    ranks = [max((f.rank for f in adapter.values()), default=0) for adapter in adapters]
    merged: dict[str, LowRank] = {}
    for name in sorted({n for adapter in adapters for n in adapter}):
        present = [adapter[name] for adapter in adapters if name in adapter]
        (out, _), (_, width) = present[0].B.shape, present[0].A.shape
        device = present[0].B.device
        lora_b = torch.zeros(out, sum(ranks), dtype=torch.float32, device=device)
        lora_a = torch.zeros(sum(ranks), width, dtype=torch.float32, device=device)
        start = 0
        for adapter, weight, rank in zip(adapters, weights, ranks, strict=True):
            factors = adapter.get(name)
            if factors is not None:
                if factors.B.shape[0] != out or factors.A.shape[1] != width:
                    raise ConfigError(
                        f"adapters disagree on the shape of {name!r}; accepted: adapters of one base model"
                    )
                coefficient = weight * factors.scaling / scaling
                lora_b[:, start : start + factors.rank] = coefficient * factors.B.float().to(device)
                lora_a[start : start + factors.rank] = factors.A.float().to(device)
            start += rank
        merged[name] = LowRank(lora_b, lora_a, scaling)
    return merged


def to_lora(factors: Mapping[str, LowRank]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A peftbench LoRA holding `factors` (one rank and scaling for all): the method config for
    `build_method` (``alpha = scaling * r``, no dropout, the layers by full name) and the tensors for its
    ``load_adapter_state_dict`` (``<layer>.lora_A``, ``<layer>.lora_B``); `io.save_adapter` writes them."""
    if not factors:
        raise ConfigError("no low-rank factors to write as a LoRA")
    ranks = {f.rank for f in factors.values()}
    scalings = {f.scaling for f in factors.values()}
    if len(ranks) != 1 or len(scalings) != 1:
        raise ConfigError(f"one LoRA needs one rank and one scaling; got ranks {sorted(ranks)}")
    bad = [n for n in factors if not n.endswith(WEIGHT_SUFFIX)]
    if bad:
        raise ConfigError(f"{bad[0]!r} is not a linear layer's weight; accepted: names ending in .weight")
    rank, scaling = ranks.pop(), scalings.pop()
    layers = {name.removesuffix(WEIGHT_SUFFIX): f for name, f in factors.items()}
    config = {
        "name": "lora",
        "r": rank,
        "alpha": scaling * rank,
        "dropout": 0.0,
        "rslora": False,
        "target_modules": sorted(layers),
    }
    state: dict[str, torch.Tensor] = {}
    for layer, f in layers.items():
        state[f"{layer}.lora_A"] = f.A.detach().float().cpu().contiguous()
        state[f"{layer}.lora_B"] = f.B.detach().float().cpu().contiguous()
    return config, state
