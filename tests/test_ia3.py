"""(IA)3 against docs/METHODS.md (vectors init 1 scale keys, values and the MLP down projection's input) and
HF PEFT's IA3 on copied weights."""

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
from peftbench.methods.ia3 import IA3Linear
from tests.helpers import clone_model, tiny_llama, token_batch

TARGETS = ["k_proj", "v_proj", "down_proj"]


def ia3_layers(model: nn.Module) -> dict[str, IA3Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, IA3Linear)}


def applied(base: nn.Module) -> tuple[nn.Module, object]:
    model = clone_model(base)
    method = build_method({"name": "ia3"})
    method.apply(model)
    torch.manual_seed(5)
    with torch.no_grad():  # "trained": vectors away from 1
        for layer in ia3_layers(model).values():
            layer.ia3_l.add_(0.3 * torch.randn_like(layer.ia3_l))
    return model, method


def test_defaults_scale_keys_values_and_the_down_projection_input() -> None:
    model = tiny_llama()
    build_method({"name": "ia3"}).apply(model)
    layers = ia3_layers(model)
    assert sorted({n.split(".")[-1] for n in layers}) == sorted(TARGETS) and len(layers) == 6
    for name, layer in layers.items():
        assert layer.feedforward == name.endswith("down_proj")
        size = layer.base.in_features if layer.feedforward else layer.base.out_features
        assert torch.equal(layer.ia3_l, torch.ones(size))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.ia3_l" for n in layers}


def test_forward_is_the_formula_in_the_whole_model() -> None:
    """The adapted model equals the base model with k/v rows and down_proj columns scaled by hand."""
    base = tiny_llama(bias=True)
    model, _ = applied(base)
    by_hand = clone_model(base)
    with torch.no_grad():
        for name, layer in ia3_layers(model).items():
            linear = by_hand.get_submodule(name)
            if name.endswith("down_proj"):  # (l ⊙ x) W^T = x (W diag(l))^T: the input is scaled
                linear.weight.mul_(layer.ia3_l[None, :])
            else:  # l ⊙ (W x + b)
                linear.weight.mul_(layer.ia3_l[:, None])
                linear.bias.mul_(layer.ia3_l)
    x = token_batch()
    with torch.no_grad():
        logits = model(x).logits
        torch.testing.assert_close(logits, by_hand(x).logits, atol=1e-5, rtol=0)
        assert (logits - base(x).logits).abs().max() > 1e-2
    layer = ia3_layers(model)["model.layers.0.self_attn.k_proj"]
    h = torch.randn(3, 32)
    torch.testing.assert_close(layer(h), layer.ia3_l * layer.base(h), atol=0, rtol=0)


@pytest.mark.parametrize("bias", [False, True])
def test_matches_hf_peft_on_copied_weights(bias: bool) -> None:
    base = tiny_llama(bias=bias)
    ours, _ = applied(base)
    config = peft.IA3Config(target_modules=TARGETS, feedforward_modules=["down_proj"])
    theirs = peft.get_peft_model(clone_model(base), config)
    with torch.no_grad():
        for name, layer in ia3_layers(ours).items():
            their_l = theirs.base_model.model.get_submodule(name).ia3_l["default"]
            assert torch.equal(their_l.flatten(), torch.ones_like(layer.ia3_l))  # the same init
            their_l.copy_(layer.ia3_l.reshape(their_l.shape))
    n_theirs = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == n_theirs
    x = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, theirs(x).logits, atol=1e-5, rtol=0)


def test_merge_is_the_formula() -> None:
    base = tiny_llama(bias=True)
    model, method = applied(base)
    layers = ia3_layers(model)
    v, down = layers["model.layers.1.self_attn.v_proj"], layers["model.layers.1.mlp.down_proj"]
    merged_v, merged_down = v.merged(), down.merged()
    torch.testing.assert_close(merged_v.weight, v.ia3_l[:, None] * v.base.weight, atol=0, rtol=0)
    torch.testing.assert_close(merged_v.bias, v.ia3_l * v.base.bias, atol=0, rtol=0)
    torch.testing.assert_close(merged_down.weight, down.base.weight * down.ia3_l[None, :], atol=0, rtol=0)
    assert torch.equal(merged_down.bias, down.base.bias)
    x = token_batch()
    with torch.no_grad():
        before = model(x).logits
        method.merge(model)
        torch.testing.assert_close(model(x).logits, before, atol=1e-5, rtol=0)


def test_peft_export_loads_in_peft(tmp_path: Path) -> None:
    base = tiny_llama()
    model, method = applied(base)
    config, tensors = method.peft_export(model)
    reference = peft.get_peft_model(
        clone_model(base), peft.IA3Config(target_modules=TARGETS, feedforward_modules=["down_proj"])
    )
    own = reference.peft_config["default"].to_dict()
    assert set(config) <= set(own) and config["peft_type"] == own["peft_type"]
    expected = peft.get_peft_model_state_dict(reference)
    assert {k: v.shape for k, v in tensors.items()} == {k: v.shape for k, v in expected.items()}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    x = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, atol=1e-5, rtol=0)


def test_disabled_gives_the_base_model() -> None:
    base = tiny_llama()
    model, method = applied(base)
    x = token_batch()
    with torch.no_grad(), method.disabled(model):
        torch.testing.assert_close(model(x).logits, base(x).logits, atol=0, rtol=0)


def test_feedforward_modules_must_be_targets() -> None:
    method = build_method(
        {"name": "ia3", "target_modules": ["k_proj", "v_proj"], "feedforward_modules": ["down_proj"]}
    )
    with pytest.raises(ConfigError, match=r"method.feedforward_modules=\['down_proj'\] selects") as info:
        method.apply(tiny_llama())
    assert "\n" not in str(info.value)


def test_no_feedforward_modules_scales_outputs_only() -> None:
    model = tiny_llama()
    build_method({"name": "ia3", "feedforward_modules": []}).apply(model)
    assert not any(layer.feedforward for layer in ia3_layers(model).values())


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ({"target_modules": []}, r"method.target_modules=\[\]"),
        ({"target_modules": [3]}, r"method.target_modules=\[3\]"),
        ({"feedforward_modules": [1]}, r"method.feedforward_modules=\[1\]"),
    ],
)
def test_bad_hyperparameters_are_one_line_errors(override: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle) as info:
        build_method({"name": "ia3", **override})
    assert "\n" not in str(info.value)
