"""LoRA against METHODS.md and against HF PEFT's LoraConfig on copied weights."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from peftbench.errors import ConfigError
from peftbench.methods import build_method
from peftbench.methods.lora import LoRALinear
from tests.helpers import clone_model, tiny_llama, token_batch


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def test_init_matches_paper() -> None:
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(64, 48), r=8, alpha=16, dropout=0.0, rslora=False)
    bound = 1 / math.sqrt(64)
    assert layer.lora_A.shape == (8, 64) and layer.lora_B.shape == (48, 8)
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.8 * bound
    assert torch.count_nonzero(layer.lora_B) == 0
    assert layer.scaling == 2.0


def test_rslora_scaling() -> None:
    layer = LoRALinear(nn.Linear(8, 8), r=16, alpha=32, dropout=0.0, rslora=True)
    assert layer.scaling == pytest.approx(32 / 4)


def test_forward_formula_and_dropout_only_on_adapter_branch() -> None:
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    layer = LoRALinear(base, r=4, alpha=8, dropout=0.5, rslora=False)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 16)
    layer.eval()
    expected = base(x) + 2.0 * (x @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(layer(x), expected)
    layer.train()
    torch.manual_seed(5)
    out = layer(x)
    torch.manual_seed(5)
    dropped = nn.functional.dropout(x, 0.5, training=True)
    torch.testing.assert_close(out, base(x) + 2.0 * (dropped @ layer.lora_A.T @ layer.lora_B.T))


def test_only_adapter_parameters_train() -> None:
    model = tiny_llama(bias=True)
    build_method({"name": "lora", "r": 4}).apply(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert len(lora_layers(model)) == 2 * 7  # q k v o gate up down, two blocks; lm_head untouched


def test_target_modules_by_name_and_regex() -> None:
    model = tiny_llama()
    build_method({"name": "lora", "r": 2, "target_modules": ["q_proj", "v_proj"]}).apply(model)
    assert sorted({n.split(".")[-1] for n in lora_layers(model)}) == ["q_proj", "v_proj"]
    model = tiny_llama()
    build_method({"name": "lora", "r": 2, "target_modules": r".*\.0\.mlp\..*"}).apply(model)
    assert len(lora_layers(model)) == 3


@pytest.mark.parametrize(
    ("override", "needle"),
    [({"r": 0}, "method.r=0"), ({"alpha": -1}, "method.alpha=-1"), ({"dropout": 1.5}, "method.dropout=1.5")],
)
def test_bad_hyperparameters_are_one_line_errors(override: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle) as info:
        build_method({"name": "lora", **override})
    assert "\n" not in str(info.value)


def test_target_that_matches_nothing_names_it() -> None:
    with pytest.raises(ConfigError, match="qkv_proj") as info:
        build_method({"name": "lora", "target_modules": ["qkv_proj"]}).apply(tiny_llama())
    assert "q_proj" in str(info.value)  # the accepted names are listed


@pytest.mark.parametrize("rslora", [False, True])
def test_matches_hf_peft_on_copied_weights(rslora: bool) -> None:
    """Same A and B in both: logits and the merged weights agree with PEFT's LoRA."""
    base = tiny_llama()
    ours = clone_model(base)
    build_method({"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "rslora": rslora}).apply(ours)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_rslora=rslora, target_modules="all-linear")
    theirs = get_peft_model(clone_model(base), config)
    torch.manual_seed(3)
    for name, layer in lora_layers(ours).items():
        nn.init.normal_(layer.lora_B, std=0.05)
        peft_layer = theirs.base_model.model.get_submodule(name)
        peft_layer.lora_A["default"].weight.data.copy_(layer.lora_A.data)
        peft_layer.lora_B["default"].weight.data.copy_(layer.lora_B.data)
        assert peft_layer.scaling["default"] == pytest.approx(layer.scaling)
    assert set(lora_layers(ours)) == {
        n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "lora_A")
    }
    x = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, theirs(x).logits, atol=1e-5, rtol=0)
    n_theirs = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == n_theirs


def test_merge_matches_formula() -> None:
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    layer = LoRALinear(base, r=4, alpha=8, dropout=0.0, rslora=False)
    nn.init.normal_(layer.lora_B)
    merged = layer.merged()
    torch.testing.assert_close(merged.weight, base.weight + 2.0 * layer.lora_B @ layer.lora_A)
    x = torch.randn(5, 16)
    torch.testing.assert_close(merged(x), layer(x), atol=1e-5, rtol=0)


def test_disabled_gives_the_base_model() -> None:
    base = tiny_llama()
    model = clone_model(base)
    method = build_method({"name": "lora", "r": 4})
    method.apply(model)
    for layer in lora_layers(model).values():
        nn.init.normal_(layer.lora_B)
    x = token_batch()
    with torch.no_grad():
        assert not torch.allclose(model(x).logits, base(x).logits)
        with method.disabled(model):
            torch.testing.assert_close(model(x).logits, base(x).logits, atol=0, rtol=0)
        assert not torch.allclose(model(x).logits, base(x).logits)


@pytest.mark.parametrize("method", ["lora", "vera", "dora", "lora_fa"])
def test_a_task_head_attached_to_the_model_is_never_a_target(method: str) -> None:
    """A reward or value head lives on the model as a linear layer (peftbench/tasks/reward_head.py,
    peftbench/rl/policy.py); `all-linear` must not wrap it: it trains whole, beside the method."""
    model = tiny_llama()
    head = torch.nn.Linear(model.config.hidden_size, 1)
    model.reward_head = head
    build_method({"name": method, "r": 2, "target_modules": "all-linear"}).apply(model, head=head)
    assert model.reward_head is head and type(head) is torch.nn.Linear
    assert all(p.requires_grad for p in head.parameters())
    assert any(p.requires_grad for n, p in model.named_parameters() if "q_proj" in n)
