"""LoRA-FA against docs/METHODS.md: LoRA's forward with A frozen, and a real activation-memory saving."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftbench.errors import ConfigError
from peftbench.methods import build_method, check_groups_cover
from peftbench.methods.lora import LoRALinear
from peftbench.methods.lora_fa import LoRAFALinear, _LoRAFABranch, precondition_grad_b
from tests.helpers import clone_model, tiny_llama, token_batch


def _layer_pair(dropout: float = 0.0, dtype: torch.dtype = torch.float32) -> tuple[LoRALinear, LoRAFALinear]:
    torch.manual_seed(0)
    base = nn.Linear(12, 10).to(dtype).requires_grad_(False)
    fa = LoRAFALinear(base, r=3, alpha=6.0, dropout=dropout, rslora=False, precondition=False)
    lora = LoRALinear(base, r=3, alpha=6.0, dropout=dropout, rslora=False)
    with torch.no_grad():
        fa.lora_B.normal_()
        lora.lora_A.copy_(fa.lora_A)
        lora.lora_B.copy_(fa.lora_B)
    return lora, fa


def test_a_is_a_frozen_buffer_and_only_b_trains() -> None:
    model = tiny_llama()
    method = build_method({"name": "lora_fa", "r": 4})
    method.apply(model)
    layers = [m for m in model.modules() if isinstance(m, LoRAFALinear)]
    assert layers and all("lora_A" in dict(m.named_buffers()) for m in layers)
    assert all(not m.lora_A.requires_grad for m in layers)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith("lora_B") for n in trainable)
    groups = method.param_groups(model, lr=1e-3, weight_decay=0.0)
    check_groups_cover(groups, model)
    # the adapter file carries the random A (it is not trainable, so it comes from extra_state)
    state = method.adapter_state_dict(model)
    assert sum(k.endswith("lora_A") for k in state) == len(layers)


def test_forward_and_gradients_equal_lora_with_the_same_a_b() -> None:
    lora, fa = _layer_pair()
    lora = lora.double()
    fa = fa.double()
    lora.lora_A.requires_grad_(False)
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 5, 10, dtype=torch.float64)
    y_lora = lora(x)
    (grad_x_lora,) = torch.autograd.grad(y_lora, x, g, retain_graph=True)
    y_lora.backward(g)
    x2 = x.detach().clone().requires_grad_(True)
    y_fa = fa(x2)
    y_fa.backward(g)
    torch.testing.assert_close(y_fa, y_lora, atol=1e-12, rtol=0)
    torch.testing.assert_close(x2.grad, grad_x_lora, atol=1e-12, rtol=0)
    torch.testing.assert_close(fa.lora_B.grad, lora.lora_B.grad, atol=1e-12, rtol=0)
    # the formulas: grad_B = s * g^T (A x), grad_x (adapter part) = s * (g B) A
    s = fa.scaling
    h = x.detach() @ fa.lora_A.T
    torch.testing.assert_close(fa.lora_B.grad, s * g.reshape(-1, 10).T @ h.reshape(-1, 3), atol=1e-12, rtol=0)


def test_gradcheck_of_the_custom_backward() -> None:
    _, fa = _layer_pair()
    fa = fa.double()
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    b = fa.lora_B.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda inp, weight_b: _LoRAFABranch.apply(inp, fa.lora_A, weight_b, fa.scaling, 0.0, False), (x, b)
    )


@pytest.mark.parametrize("autocast", [False, True])
def test_low_precision_keeps_dtypes(autocast: bool) -> None:
    _, fa = _layer_pair(dtype=torch.float32 if autocast else torch.bfloat16)
    x = torch.randn(2, 5, 12, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = fa(x.to(fa.base.weight.dtype) if not autocast else x)
    y.float().sum().backward()
    assert fa.lora_B.grad is not None and fa.lora_B.grad.dtype == fa.lora_B.dtype
    assert x.grad is not None and x.grad.dtype == torch.bfloat16


def test_dropout_mask_is_the_same_in_forward_and_backward() -> None:
    _, fa = _layer_pair(dropout=0.5)
    fa = fa.double().train()
    x = torch.randn(4, 7, 12, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, 7, 10, dtype=torch.float64)
    torch.manual_seed(3)
    y = fa.adapter_branch(x)  # s * B A (m ⊙ x) / (1 - p), linear in x and in B
    y.backward(g)
    # with one mask m in both passes: <grad_x, x> = <g, y> and <grad_B, B> = <g, y>
    expected = (g * y).sum()
    torch.testing.assert_close((x.grad * x).sum(), expected, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close((fa.lora_B.grad * fa.lora_B).sum(), expected, atol=1e-10, rtol=1e-10)
    # dropout really acts in training (and not in eval), reproducibly under the global seed
    torch.manual_seed(3)
    torch.testing.assert_close(fa.adapter_branch(x), y)
    no_drop = fa.eval().adapter_branch(x)
    assert not torch.allclose(no_drop, y)


def test_precondition_matches_the_v2_formula() -> None:
    torch.manual_seed(0)
    base = nn.Linear(12, 10).requires_grad_(False)
    plain = LoRAFALinear(base, r=3, alpha=6.0, dropout=0.0, rslora=False, precondition=False)
    pre = LoRAFALinear(base, r=3, alpha=6.0, dropout=0.0, rslora=False, precondition=True)
    with torch.no_grad():
        pre.lora_A.copy_(plain.lora_A)
        plain.lora_B.normal_()
        pre.lora_B.copy_(plain.lora_B)
    x = torch.randn(6, 12)
    plain(x).square().sum().backward()
    pre(x).square().sum().backward()
    a, s = plain.lora_A, plain.scaling
    expected = plain.lora_B.grad @ torch.linalg.inv(a @ a.T + 1e-8 * torch.eye(3)) / s**2
    torch.testing.assert_close(pre.lora_B.grad, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(precondition_grad_b(plain.lora_B.grad, a, s), expected, atol=1e-5, rtol=1e-5)


def test_matches_peft_lora_on_copied_weights() -> None:
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    ours = clone_model(base)
    torch.manual_seed(0)
    build_method({"name": "lora_fa", "r": 4, "alpha": 8, "dropout": 0.0}).apply(ours)
    reference = peft.get_peft_model(
        clone_model(base), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
    )
    peft_params = dict(reference.named_parameters())
    with torch.no_grad():
        for name, layer in ours.named_modules():
            if isinstance(layer, LoRAFALinear):
                layer.lora_B.normal_(std=0.1)
                peft_params[f"base_model.model.{name}.lora_A.default.weight"].copy_(layer.lora_A)
                peft_params[f"base_model.model.{name}.lora_B.default.weight"].copy_(layer.lora_B)
    x = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x).logits, reference.eval()(x).logits, atol=1e-5, rtol=0)


def _saved_activation_bytes(model: nn.Module) -> int:
    """Bytes of the distinct storages autograd saves during a training forward, weights excluded."""
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    x = token_batch(batch=4, length=64)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x, labels=x).loss
    loss.backward()
    return sum(saved.values())


@pytest.mark.parametrize(("dropout", "at_least"), [(0.0, 1.2), (0.05, 1.8)])
def test_saves_clearly_fewer_activation_bytes_than_lora(dropout: float, at_least: float) -> None:
    measured = {}
    for name in ("lora", "lora_fa"):
        model = tiny_llama()
        torch.manual_seed(0)
        build_method({"name": name, "r": 4, "dropout": dropout}).apply(model)
        measured[name] = _saved_activation_bytes(model.train())
    ratio = measured["lora"] / measured["lora_fa"]
    print(f"saved activation bytes (dropout={dropout}): {measured}, LoRA / LoRA-FA = {ratio:.2f}")
    assert ratio >= at_least


def test_validate_rejects_a_non_bool_precondition() -> None:
    with pytest.raises(ConfigError, match=r"method\.precondition"):
        build_method({"name": "lora_fa", "precondition": "yes"})
