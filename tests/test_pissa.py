"""PiSSA against docs/METHODS.md (A, B from the top-r SVD of W0, residual W0 - sBA frozen) and HF PEFT."""

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
from peftbench.methods.io import load_adapter, save_adapter
from peftbench.methods.pissa import PiSSALinear
from tests.helpers import clone_model, tiny_llama, token_batch


def pissa_layers(model: nn.Module) -> dict[str, PiSSALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, PiSSALinear)}


def applied(base: nn.Module, **kw: object) -> tuple[nn.Module, object]:
    model = clone_model(base)
    method = build_method({"name": "pissa", "r": 4, "alpha": 8, **kw})
    method.apply(model)
    return model, method


def test_factors_are_the_principal_components() -> None:
    base = tiny_llama()
    model, method = applied(base)
    assert method.modifies_base and method.identity_at_init and method.mergeable
    for name, layer in pissa_layers(model).items():
        w0 = base.get_submodule(name).weight
        u, s, vh = torch.linalg.svd(w0, full_matrices=False)
        top = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]
        torch.testing.assert_close(layer.delta_weight(), top, atol=1e-5, rtol=0)  # s B A = best rank 4
        torch.testing.assert_close(layer.base.weight, w0 - top, atol=1e-5, rtol=0)  # the frozen residual
        # A = sqrt(S_r / s) V_r^T has orthogonal rows: A A^T = diag(S_r) / s (s = alpha / r = 2)
        torch.testing.assert_close(layer.lora_A @ layer.lora_A.T, torch.diag(s[:4]) / 2, atol=1e-5, rtol=0)
        assert torch.equal(layer.init_A, layer.lora_A) and torch.equal(layer.init_B, layer.lora_B)
    x = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, base(x).logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("rslora", [False, True])
def test_matches_hf_peft_init_exactly(rslora: bool) -> None:
    """PEFT's full-SVD PiSSA: the same A, B and residual to the bit; the same logits after a perturbation."""
    base = tiny_llama()
    ours, _ = applied(base, rslora=rslora)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        use_rslora=rslora,
        init_lora_weights="pissa",
        target_modules="all-linear",
    )
    theirs = peft.get_peft_model(clone_model(base), config)
    torch.manual_seed(0)
    for name, layer in pissa_layers(ours).items():
        peft_layer = theirs.base_model.model.get_submodule(name)
        assert torch.equal(layer.lora_A, peft_layer.lora_A["default"].weight), name
        assert torch.equal(layer.lora_B, peft_layer.lora_B["default"].weight), name
        assert torch.equal(layer.base.weight, peft_layer.base_layer.weight), name
        with torch.no_grad():  # "trained"
            layer.lora_B.add_(0.05 * torch.randn_like(layer.lora_B))
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B)
    x = token_batch()
    with torch.no_grad():
        logits = ours.eval()(x).logits
        torch.testing.assert_close(logits, theirs.eval()(x).logits, atol=1e-5, rtol=0)
        assert (logits - base(x).logits).abs().max() > 1e-3


def test_randomized_svd_keeps_residual_plus_update_equal_to_w0() -> None:
    base = tiny_llama()
    model, _ = applied(base, svd_niter=2)
    for name, layer in pissa_layers(model).items():
        w0 = base.get_submodule(name).weight
        torch.testing.assert_close(layer.base.weight + layer.delta_weight(), w0, atol=1e-6, rtol=0)


def test_reload_rebuilds_the_residual_from_the_saved_factors(tmp_path: Path) -> None:
    """A fresh model whose own SVD came out differently (here: the randomized one) gets the residual of the
    saved factors: the reloaded logits are the trained model's."""
    base = tiny_llama()
    model, method = applied(base)
    with torch.no_grad():
        for layer in pissa_layers(model).values():
            layer.lora_A.add_(0.05 * torch.randn_like(layer.lora_A))
    state = method.adapter_state_dict(model)
    other, other_method = applied(base, svd_niter=1)
    name = "model.layers.0.mlp.up_proj"
    assert not torch.allclose(pissa_layers(other)[name].base.weight, pissa_layers(model)[name].base.weight)
    other_method.load_adapter_state_dict(other, state)
    x = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(other(x).logits, model(x).logits, atol=1e-5, rtol=0)
    # the ordinary path: same SVD, the residual is left as it is, the reload is exact
    fresh = clone_model(base)
    load_adapter(fresh, save_adapter(model, method, tmp_path / "a"))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, model(x).logits, atol=0, rtol=0)


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_export_is_a_rank_2r_lora_on_the_original_base(rslora: bool, tmp_path: Path) -> None:
    base = tiny_llama()
    model, method = applied(base, rslora=rslora)
    with torch.no_grad():  # "trained"
        for layer in pissa_layers(model).values():
            layer.lora_A.add_(0.05 * torch.randn_like(layer.lora_A))
            layer.lora_B.add_(0.05 * torch.randn_like(layer.lora_B))
    config, tensors = method.peft_export(model)
    assert (config["r"], config["init_lora_weights"], config["use_dora"]) == (8, True, False)
    assert tensors["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"].shape == (8, 32)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    layer = loaded.base_model.model.get_submodule("model.layers.0.mlp.up_proj")
    assert layer.scaling["default"] == pytest.approx(
        pissa_layers(model)["model.layers.0.mlp.up_proj"].scaling
    )
    assert torch.equal(layer.base_layer.weight, base.get_submodule("model.layers.0.mlp.up_proj").weight)
    x = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, atol=1e-5, rtol=0)


def test_merge_and_disabled() -> None:
    base = tiny_llama()
    model, method = applied(base)
    layer = pissa_layers(model)["model.layers.1.self_attn.q_proj"]
    with torch.no_grad():
        layer.lora_B.mul_(1.5)
    merged = layer.merged()
    torch.testing.assert_close(merged.weight, layer.base.weight + 2.0 * layer.lora_B @ layer.lora_A)
    with pytest.raises(ConfigError, match="changes the base weights in place"), method.disabled(model):
        pass


def test_quantized_base_is_refused() -> None:
    model = tiny_llama()
    layer = model.model.layers[0].self_attn.q_proj
    layer.__class__ = type("Linear4bit", (nn.Linear,), {})  # what bitsandbytes calls it
    with pytest.raises(ConfigError, match=r"method=pissa .*q_proj .*Linear4bit"):
        build_method({"name": "pissa", "r": 4}).apply(model)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ({"svd_niter": -1}, "method.svd_niter=-1"),
        ({"svd_niter": 1.5}, "method.svd_niter=1.5"),
        ({"r": 0}, "method.r=0"),
        ({"dropout": -0.1}, "method.dropout=-0.1"),
    ],
)
def test_bad_hyperparameters_are_one_line_errors(override: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle) as info:
        build_method({"name": "pissa", **override})
    assert "\n" not in str(info.value)


def test_rank_above_the_layer_rank_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"method.r=17 exceeds the rank of .*k_proj \(16, 32\)") as info:
        build_method({"name": "pissa", "r": 17}).apply(tiny_llama())
    assert "\n" not in str(info.value)
