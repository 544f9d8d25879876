"""DoRA against docs/METHODS.md (W' = m ⊙ (W0 + sBA) / ||W0 + sBA||_row, the norm detached) and HF PEFT."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from peftbench.errors import ConfigError
from peftbench.methods import build_method
from peftbench.methods.dora import DoRALinear
from tests.helpers import clone_model, tiny_llama, token_batch


def dora_layers(model: nn.Module) -> dict[str, DoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, DoRALinear)}


def perturbed_layer(dropout: float = 0.0) -> DoRALinear:
    torch.manual_seed(0)
    layer = DoRALinear(nn.Linear(16, 12), r=4, alpha=8, dropout=dropout, rslora=False)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.3)
        layer.magnitude.mul_(1 + 0.2 * torch.randn(12))
    return layer


def by_hand(layer: DoRALinear, x: torch.Tensor, detach_norm: bool = True) -> torch.Tensor:
    """METHODS.md: ``W' x + b`` with ``W' = m ⊙ V / ||V||_row``, ``V = W0 + s B A``."""
    direction = layer.base.weight + 2.0 * layer.lora_B @ layer.lora_A
    norm = direction.norm(dim=1, keepdim=True)
    weight = layer.magnitude[:, None] * direction / (norm.detach() if detach_norm else norm)
    return x @ weight.T + layer.base.bias


def test_init_magnitude_is_the_row_norm_of_w0() -> None:
    layer = DoRALinear(nn.Linear(16, 12), r=4, alpha=8, dropout=0.0, rslora=False)
    torch.testing.assert_close(layer.magnitude, layer.base.weight.norm(dim=1), atol=0, rtol=0)
    assert torch.count_nonzero(layer.lora_B) == 0 and layer.lora_A.abs().max() > 0
    x = torch.randn(3, 16)
    assert torch.equal(layer(x), layer.base(x))


def test_forward_is_the_formula() -> None:
    layer = perturbed_layer().eval()
    x = torch.randn(5, 16)
    torch.testing.assert_close(layer(x), by_hand(layer, x), atol=1e-6, rtol=0)
    assert (layer(x) - layer.base(x)).abs().max() > 1e-2


def test_norm_is_detached_from_the_graph() -> None:
    """Sec. 4.3: gradients equal those of the formula with a constant norm, not of the full formula."""
    layer = perturbed_layer()
    x = torch.randn(5, 16)
    params = [layer.lora_A, layer.lora_B, layer.magnitude]
    ours = torch.autograd.grad(layer(x).square().sum(), params)
    detached = torch.autograd.grad(by_hand(layer, x).square().sum(), params)
    full = torch.autograd.grad(by_hand(layer, x, detach_norm=False).square().sum(), params)
    for got, want in zip(ours, detached, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the check can tell the two apart: A and B (not m) get other gradients through a live norm
    assert min((ours[i] - full[i]).abs().max() for i in (0, 1)) > 1e-3
    assert layer.base.weight.grad is None


def test_dropout_feeds_the_whole_dora_term_in_training() -> None:
    layer = perturbed_layer(dropout=0.5).train()
    x = torch.randn(5, 16)
    torch.manual_seed(7)
    out = layer(x)
    torch.manual_seed(7)
    dropped = nn.functional.dropout(x, 0.5, training=True)
    g = layer.magnitude / (layer.base.weight + 2.0 * layer.lora_B @ layer.lora_A).norm(dim=1)
    expected = (
        layer.base(x)
        + (g - 1) * (dropped @ layer.base.weight.T)
        + g * 2.0 * (dropped @ (layer.lora_B @ layer.lora_A).T)
    )
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_merge_is_the_formula() -> None:
    layer = perturbed_layer().eval()
    merged = layer.merged()
    direction = layer.base.weight + 2.0 * layer.lora_B @ layer.lora_A
    expected = layer.magnitude[:, None] * direction / direction.norm(dim=1, keepdim=True)
    torch.testing.assert_close(merged.weight, expected, atol=1e-6, rtol=0)
    assert torch.equal(merged.bias, layer.base.bias)
    x = torch.randn(5, 16)
    torch.testing.assert_close(merged(x), layer(x), atol=1e-5, rtol=0)


def applied_pair(dropout: float = 0.0) -> tuple[nn.Module, nn.Module, nn.Module]:
    """The base, peftbench's DoRA and PEFT's DoRA on copies of it, with the same perturbed A, B, m."""
    base = tiny_llama()
    ours = clone_model(base)
    build_method({"name": "dora", "r": 4, "alpha": 8, "dropout": dropout}).apply(ours)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, use_dora=True, target_modules="all-linear"
    )
    theirs = peft.get_peft_model(clone_model(base), config)
    torch.manual_seed(3)
    for name, layer in dora_layers(ours).items():
        peft_layer = theirs.base_model.model.get_submodule(name)
        torch.testing.assert_close(  # the same init of m
            peft_layer.lora_magnitude_vector["default"].weight, layer.magnitude, atol=1e-6, rtol=0
        )
        with torch.no_grad():
            layer.lora_B.normal_(std=0.05)
            layer.magnitude.mul_(1 + 0.1 * torch.randn_like(layer.magnitude))
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B)
            peft_layer.lora_magnitude_vector["default"].weight.copy_(layer.magnitude)
    return base, ours, theirs


def test_matches_hf_peft_on_copied_weights() -> None:
    base, ours, theirs = applied_pair()
    assert len(dora_layers(ours)) == 14
    n_theirs = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == n_theirs
    x = token_batch()
    with torch.no_grad():
        logits = ours.eval()(x).logits
        torch.testing.assert_close(logits, theirs.eval()(x).logits, atol=1e-5, rtol=0)
        assert (logits - base(x).logits).abs().max() > 1e-3


def test_matches_hf_peft_in_training_with_dropout() -> None:
    """Same dropout masks (same seed, one draw per layer in the same order): same loss and gradients."""
    _, ours, theirs = applied_pair(dropout=0.3)
    x = token_batch()
    losses = []
    for model in (ours.train(), theirs.train()):
        torch.manual_seed(11)
        loss = model(x, labels=x).loss
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=0)
    for name, layer in dora_layers(ours).items():
        peft_layer = theirs.base_model.model.get_submodule(name)
        their_grad = peft_layer.lora_magnitude_vector["default"].weight.grad
        torch.testing.assert_close(layer.magnitude.grad, their_grad, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(
            layer.lora_A.grad, peft_layer.lora_A["default"].weight.grad, atol=1e-5, rtol=1e-4
        )


def test_peft_export_loads_in_peft(tmp_path: Path) -> None:
    base, ours, theirs = applied_pair()
    with torch.no_grad():  # A changed too: everything must come from the file
        for layer in dora_layers(ours).values():
            layer.lora_A.add_(0.05 * torch.randn_like(layer.lora_A))
    method = build_method({"name": "dora", "r": 4, "alpha": 8, "dropout": 0.0})
    config, tensors = method.peft_export(ours)
    own = theirs.peft_config["default"].to_dict()
    assert set(config) <= set(own)
    for key in ("peft_type", "r", "lora_alpha", "use_dora", "use_rslora"):
        assert config[key] == own[key], key
    assert set(config["target_modules"]) == set(own["target_modules"])
    assert set(tensors) == set(peft.get_peft_model_state_dict(theirs))
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    x = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, ours.eval()(x).logits, atol=1e-5, rtol=0)


def test_disabled_gives_the_base_model() -> None:
    base, ours, _ = applied_pair()
    method = build_method({"name": "dora", "r": 4, "alpha": 8})
    x = token_batch()
    with torch.no_grad(), method.disabled(ours):
        torch.testing.assert_close(ours(x).logits, base(x).logits, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("override", "needle"),
    [({"r": 0}, "method.r=0"), ({"alpha": 0}, "method.alpha=0"), ({"dropout": 1.0}, "method.dropout=1.0")],
)
def test_bad_hyperparameters_are_one_line_errors(override: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle) as info:
        build_method({"name": "dora", **override})
    assert "\n" not in str(info.value)
