"""VeRA against docs/METHODS.md and HF PEFT's VeRA: shared seeded projections, trainable b and d only."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from peftbench.errors import ConfigError
from peftbench.methods import build_method
from peftbench.methods.io import load_adapter, save_adapter
from peftbench.methods.vera import PROJECTIONS, VeRALinear
from tests.helpers import clone_model, tiny_llama, token_batch


def _vera(r: int = 8, **kw: object) -> tuple[nn.Module, object]:
    model = tiny_llama()
    method = build_method({"name": "vera", "r": r, **kw})
    method.apply(model)
    return model, method


def _vera_layers(model: nn.Module) -> dict[str, VeRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, VeRALinear)}


def test_projections_shared_stored_once_and_frozen() -> None:
    model, method = _vera()
    proj = getattr(model, PROJECTIONS)
    layers = _vera_layers(model)
    assert proj.vera_A.shape == (8, 64) and proj.vera_B.shape == (64, 8)  # in_max = out_max = 64 (MLP)
    assert all(layer.projections is proj for layer in layers.values())
    keys = [k for k in model.state_dict() if "vera_A" in k or "vera_B" in k]
    assert keys == [f"{PROJECTIONS}.vera_A", f"{PROJECTIONS}.vera_B"]
    assert not any(p.requires_grad for p in proj.parameters()) and not list(proj.parameters())
    # init: b = 0, d = d_initial; trainable = sum(out + r)
    for layer in layers.values():
        assert torch.equal(layer.vera_b, torch.zeros_like(layer.vera_b))
        assert torch.equal(layer.vera_d, torch.full_like(layer.vera_d, 0.1))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == sum(m.out_features + 8 for m in layers.values())
    # a deep copy keeps one shared pair
    copied = clone_model(model)
    assert all(layer.projections is getattr(copied, PROJECTIONS) for layer in _vera_layers(copied).values())
    # the adapter file holds the seed, not the matrices
    state = method.adapter_state_dict(model)
    assert not any("vera_A" in k or "vera_B" in k for k in state)


def test_projection_init_is_seeded_kaiming_uniform() -> None:
    model, _ = _vera(r=8, projection_seed=7)
    proj = getattr(model, PROJECTIONS)
    bound_a, bound_b = math.sqrt(6 / 64), math.sqrt(6 / 8)
    assert proj.vera_A.abs().max() <= bound_a and proj.vera_A.abs().max() > 0.9 * bound_a
    assert proj.vera_B.abs().max() <= bound_b and proj.vera_B.abs().max() > 0.9 * bound_b
    generator = torch.Generator().manual_seed(7)
    expected_a = torch.empty(8, 64).uniform_(-bound_a, bound_a, generator=generator)
    expected_b = torch.empty(64, 8).uniform_(-bound_b, bound_b, generator=generator)
    assert torch.equal(proj.vera_A, expected_a) and torch.equal(proj.vera_B, expected_b)
    other, _ = _vera(r=8, projection_seed=8)
    assert not torch.equal(getattr(other, PROJECTIONS).vera_A, proj.vera_A)


def test_forward_is_the_formula() -> None:
    model, _ = _vera()
    proj = getattr(model, PROJECTIONS)
    layer = _vera_layers(model)["model.layers.0.self_attn.k_proj"]  # (16, 32): both slices are strict
    with torch.no_grad():
        layer.vera_b.normal_()
        layer.vera_d.normal_()
    x = torch.randn(3, 32)
    expected = layer.base(x) + layer.vera_b * (
        (layer.vera_d * (x @ proj.vera_A[:, :32].T)) @ proj.vera_B[:16].T
    )
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=0)
    delta = torch.diag(layer.vera_b) @ proj.vera_B[:16] @ torch.diag(layer.vera_d) @ proj.vera_A[:, :32]
    torch.testing.assert_close(layer.delta_weight(), delta, atol=1e-6, rtol=0)


def test_matches_peft_vera_with_the_same_seed() -> None:
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    ours = clone_model(base)
    build_method({"name": "vera", "r": 8, "projection_seed": 3}).apply(ours)
    config = peft.VeraConfig(r=8, target_modules="all-linear", projection_prng_key=3, d_initial=0.1)
    reference = peft.get_peft_model(clone_model(base), config)
    proj = getattr(ours, PROJECTIONS)
    assert torch.equal(proj.vera_A, reference.base_model.vera_A["default"])
    assert torch.equal(proj.vera_B, reference.base_model.vera_B["default"])
    peft_params = dict(reference.named_parameters())
    with torch.no_grad():
        for name, layer in _vera_layers(ours).items():
            layer.vera_b.normal_(std=0.5)
            layer.vera_d.normal_()
            peft_params[f"base_model.model.{name}.vera_lambda_b.default"].copy_(layer.vera_b)
            peft_params[f"base_model.model.{name}.vera_lambda_d.default"].copy_(layer.vera_d)
    x = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x).logits, reference.eval()(x).logits, atol=1e-5, rtol=0)


def test_reload_regenerates_the_projections_and_checks_them(tmp_path: Path) -> None:
    model, method = _vera(projection_seed=5)
    with torch.no_grad():
        for layer in _vera_layers(model).values():
            layer.vera_b.normal_()
    path = save_adapter(model, method, tmp_path / "a")
    fresh = tiny_llama()
    load_adapter(fresh, path)
    assert torch.equal(getattr(fresh, PROJECTIONS).vera_A, getattr(model, PROJECTIONS).vera_A)
    # a base of another shape gets another projection shape: refused, not silently wrong
    wrong_method = build_method({"name": "vera", "r": 8, "projection_seed": 5, "target_modules": ["q_proj"]})
    other = tiny_llama()
    wrong_method.apply(other)
    with pytest.raises(ConfigError, match="do not match"):
        wrong_method.load_adapter_state_dict(other, method.adapter_state_dict(model))


def test_merge_drops_the_projections() -> None:
    model, method = _vera()
    method.merge(model)
    assert not hasattr(model, PROJECTIONS)
    assert not any("vera" in k for k in model.state_dict())


@pytest.mark.parametrize(
    ("key", "value"),
    [("d_initial", 0.0), ("d_initial", float("nan")), ("r", 0), ("projection_seed", -1), ("dropout", 1.0)],
)
def test_validate_rejects_bad_values(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"method\.{key}"):
        build_method({"name": "vera", key: value})
