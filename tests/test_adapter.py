"""Houlsby bottleneck adapters against docs/METHODS.md: ``h + W_up f(W_down h)`` after attention and after the
MLP, W_up = 0 at init, bottleneck 64 by default (HF PEFT has no such method: checked by hand)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peftbench.errors import ConfigError
from peftbench.methods import build_method
from peftbench.methods.adapter import BottleneckAdapter
from tests.helpers import clone_model, tiny_llama, token_batch


def adapters(model: nn.Module) -> dict[str, BottleneckAdapter]:
    return {n: m for n, m in model.named_modules() if isinstance(m, BottleneckAdapter)}


def applied(base: nn.Module, **kw: object) -> tuple[nn.Module, object]:
    model = clone_model(base)
    method = build_method({"name": "adapter", **kw})
    method.apply(model)
    return model, method


def perturb(model: nn.Module) -> None:
    torch.manual_seed(2)
    with torch.no_grad():
        for layer in adapters(model).values():
            layer.up_weight.normal_(std=0.1)
            layer.up_bias.normal_(std=0.01)
            layer.down_bias.normal_(std=0.1)


def test_placement_init_and_count() -> None:
    base = tiny_llama()
    model, method = applied(base)
    assert sorted(adapters(model)) == [
        f"model.layers.{i}.{part}" for i in (0, 1) for part in ("mlp.down_proj", "self_attn.o_proj")
    ]
    for layer in adapters(model).values():
        assert layer.down_weight.shape == (64, 32) and layer.up_weight.shape == (32, 64)  # default m = 64
        assert torch.count_nonzero(layer.up_weight) == 0 and torch.count_nonzero(layer.up_bias) == 0
        assert torch.count_nonzero(layer.down_bias) == 0
        bound = 1 / math.sqrt(32)
        assert bound >= layer.down_weight.abs().max() > 0.8 * bound
    # Sec. 2.1: 2 m d + m + d per adapter
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 4 * (2 * 64 * 32 + 64 + 32)
    assert not method.mergeable and method.identity_at_init and not method.modifies_base
    x = token_batch()
    with torch.no_grad():
        assert torch.equal(model(x).logits, base(x).logits)


@pytest.mark.parametrize("activation", ["gelu", "relu", "silu", "tanh"])
def test_forward_is_the_formula(activation: str) -> None:
    model, _ = applied(tiny_llama(), bottleneck_size=8, activation=activation)
    perturb(model)
    layer = adapters(model)["model.layers.0.self_attn.o_proj"]
    f = {"gelu": F.gelu, "relu": torch.relu, "silu": F.silu, "tanh": torch.tanh}[activation]
    x = torch.randn(3, 5, 32)
    h = x @ layer.base.weight.T
    expected = h + f(h @ layer.down_weight.T + layer.down_bias) @ layer.up_weight.T + layer.up_bias
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=0)
    assert (layer(x) - h).abs().max() > 1e-2


def test_the_adapters_sit_between_each_sublayer_and_its_residual_add() -> None:
    """A block computes ``x + a(attn) + a(mlp)`` where attn / mlp are the raw sub-layer outputs (those of
    o_proj / down_proj) and ``a(h) = h + W_up f(W_down h + b_down) + b_up``."""
    model, _ = applied(tiny_llama(), bottleneck_size=8)
    perturb(model)
    block = model.model.layers[1]
    seen: dict[str, torch.Tensor] = {}

    def keep(key: str):
        def hook(_module: nn.Module, args: tuple, kwargs: dict, out: object) -> None:
            seen[key] = out[0] if isinstance(out, tuple) else out
            seen[f"{key}_in"] = args[0] if args else kwargs["hidden_states"]

        return hook

    hooks = [
        block.register_forward_hook(keep("block"), with_kwargs=True),
        block.self_attn.o_proj.base.register_forward_hook(keep("attn"), with_kwargs=True),
        block.mlp.down_proj.base.register_forward_hook(keep("mlp"), with_kwargs=True),
    ]
    with torch.no_grad():
        model(token_batch())
    for handle in hooks:
        handle.remove()

    def adapt(layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return h + F.gelu(h @ layer.down_weight.T + layer.down_bias) @ layer.up_weight.T + layer.up_bias

    attn = adapt(block.self_attn.o_proj, seen["attn"])
    expected = seen["block_in"] + attn + adapt(block.mlp.down_proj, seen["mlp"])
    torch.testing.assert_close(seen["block"], expected, atol=1e-5, rtol=0)
    assert (attn - seen["attn"]).abs().max() > 1e-3


def test_gradients_reach_only_the_adapters() -> None:
    model, _ = applied(tiny_llama(), bottleneck_size=8)
    perturb(model)
    model.train()
    x = token_batch()
    model(x, labels=x).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    expected = {
        f"{a}.{p}" for a in adapters(model) for p in ("down_weight", "down_bias", "up_weight", "up_bias")
    }
    assert with_grad == expected
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in with_grad)


def test_disabled_gives_the_base_and_merge_is_refused() -> None:
    base = tiny_llama()
    model, method = applied(base, bottleneck_size=8)
    perturb(model)
    x = token_batch()
    with torch.no_grad(), method.disabled(model):
        assert torch.equal(model(x).logits, base(x).logits)
    with pytest.raises(ConfigError, match="cannot be merged"):
        method.merge(model)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ({"bottleneck_size": 0}, "method.bottleneck_size=0"),
        ({"bottleneck_size": 8.0}, "method.bottleneck_size=8.0"),
        ({"activation": "swish"}, "method.activation='swish' .*gelu, relu, silu, tanh"),
        ({"target_modules": ["attn_out"]}, "attn_out"),
    ],
)
def test_bad_hyperparameters_are_one_line_errors(override: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle) as info:
        build_method({"name": "adapter", **override}).apply(tiny_llama())
    assert "\n" not in str(info.value)
