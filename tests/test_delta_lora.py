"""Delta-LoRA against docs/METHODS.md: W0 <- W0 + lambda * s * (B'A' - BA) after each step t > K."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from peftbench.errors import ConfigError
from peftbench.methods import build_method, check_groups_cover
from peftbench.methods.delta_lora import DeltaLoRALinear
from peftbench.methods.io import load_adapter, save_adapter
from tests.helpers import tiny_llama, token_batch


def _layers(model: nn.Module) -> dict[str, DeltaLoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, DeltaLoRALinear)}


def _snapshot(model: nn.Module) -> dict[str, tuple[torch.Tensor, ...]]:
    return {
        n: (
            m.base.weight.detach().float().clone(),
            m.lora_A.detach().float().clone(),
            m.lora_B.detach().float().clone(),
        )
        for n, m in _layers(model).items()
    }


def _step(model: nn.Module, method, opt: torch.optim.Optimizer, step: int) -> None:
    batch = token_batch(seed=step)
    model(batch, labels=batch).loss.backward()
    opt.step()
    opt.zero_grad()
    method.after_optimizer_step(model, step)


def test_w0_moves_by_lambda_s_delta_ba_only_after_k() -> None:
    model = tiny_llama().train()
    method = build_method({"name": "delta_lora", "r": 4, "alpha": 8, "update_ratio": 2.0, "warmup_steps": 1})
    method.apply(model)
    assert method.modifies_base
    groups = method.param_groups(model, lr=1e-2, weight_decay=0.1)
    check_groups_cover(groups, model)
    in_groups = {id(p) for g in groups for p in g["params"]}
    assert not any(id(m.base.weight) in in_groups for m in _layers(model).values())
    opt = torch.optim.AdamW(groups)

    before = _snapshot(model)
    _step(model, method, opt, step=1)  # step 1 <= K: W0 untouched, A and B moved
    after = _snapshot(model)
    for name, layer in _layers(model).items():
        assert layer.base.weight.grad is None
        assert torch.equal(after[name][0], before[name][0])
        assert not torch.equal(after[name][2], before[name][2])
    assert not any(id(m.base.weight) in opt.state for m in _layers(model).values())

    _step(model, method, opt, step=2)  # step 2 > K: the delta rule
    final = _snapshot(model)
    for name, layer in _layers(model).items():
        w_old, a_old, b_old = after[name]
        w_new, a_new, b_new = final[name]
        expected = 2.0 * layer.scaling * (b_new @ a_new - b_old @ a_old)
        assert expected.abs().max() > 0
        torch.testing.assert_close(w_new - w_old, expected, atol=1e-6, rtol=0)


def test_bf16_base_accumulates_in_an_fp32_master() -> None:
    model = tiny_llama().to(torch.bfloat16)
    method = build_method({"name": "delta_lora", "r": 4, "warmup_steps": 0})
    method.apply(model)
    layer = _layers(model)["model.layers.0.self_attn.q_proj"]
    assert layer.w0_master is not None and layer.w0_master.dtype == torch.float32
    master0 = layer.w0_master.clone()
    total = torch.zeros_like(master0)
    with torch.no_grad():
        for step in range(1, 4):
            a_old, b_old = layer.lora_A.float().clone(), layer.lora_B.float().clone()
            layer.lora_B.add_(1e-3 * torch.randn_like(layer.lora_B))  # a small, bf16-sized change
            method.after_optimizer_step(model, step)
            total += (
                method.update_ratio
                * layer.scaling
                * (layer.lora_B.float() @ layer.lora_A.float() - b_old @ a_old)
            )
    torch.testing.assert_close(layer.w0_master - master0, total, atol=1e-6, rtol=0)
    assert torch.equal(layer.base.weight, layer.w0_master.to(torch.bfloat16))


def test_reload_restores_the_modified_weights_exactly(tmp_path: Path) -> None:
    model = tiny_llama().to(torch.bfloat16).train()
    method = build_method({"name": "delta_lora", "r": 4, "warmup_steps": 0})
    method.apply(model)
    opt = torch.optim.AdamW(method.param_groups(model, lr=1e-2, weight_decay=0.0))
    for step in (1, 2):
        _step(model, method, opt, step)
    path = save_adapter(model, method, tmp_path / "a")
    fresh = tiny_llama().to(torch.bfloat16)
    load_adapter(fresh, path)
    for name, layer in _layers(fresh).items():
        ref = _layers(model)[name]
        assert torch.equal(layer.base.weight, ref.base.weight)
        assert torch.equal(layer.w0_master, ref.w0_master)
        assert torch.equal(layer.prev_B, ref.lora_B.float())


def test_dropout_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"method\.dropout"):
        build_method({"name": "delta_lora", "dropout": 0.05})


@pytest.mark.parametrize(
    ("key", "value"), [("warmup_steps", -1), ("warmup_steps", 1.5), ("update_ratio", -1.0)]
)
def test_validate_rejects_bad_values(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"method\.{key}"):
        build_method({"name": "delta_lora", key: value})


def test_quantized_base_is_rejected() -> None:
    bnb = pytest.importorskip("bitsandbytes")
    model = tiny_llama()
    attn = model.model.layers[0].self_attn
    attn.q_proj = bnb.nn.Linear4bit(32, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4").to(
        "cpu"
    )
    with pytest.raises(ConfigError, match="quantized"):
        build_method({"name": "delta_lora"}).apply(model)


def test_fractional_warmup_is_resolved_against_the_run_length() -> None:
    """`warmup_steps: 0.25` on a 8-step run: W0 moves from step 3 on (K = 2), not before."""
    model = tiny_llama()
    method = build_method({"name": "delta_lora", "r": 2, "warmup_steps": 0.25})
    method.apply(model)
    method.plan_training(8)
    layer = next(m for m in model.modules() if isinstance(m, DeltaLoRALinear))
    opt = torch.optim.AdamW(method.param_groups(model, lr=1e-2, weight_decay=0.0))
    moved = []
    for step in range(1, 5):
        before = layer.base.weight.detach().clone()
        model(token_batch(), labels=token_batch()).loss.backward()
        opt.step()
        opt.zero_grad()
        method.after_optimizer_step(model, step)
        moved.append(not torch.equal(before, layer.base.weight))
    assert moved == [False, False, True, True]


def test_fraction_without_a_plan_is_an_error() -> None:
    method = build_method({"name": "delta_lora", "r": 2, "warmup_steps": 0.5})
    model = tiny_llama()
    method.apply(model)
    with pytest.raises(RuntimeError, match="plan_training"):
        method.after_optimizer_step(model, 1)


def test_disabled_refuses_because_the_base_was_changed_in_place() -> None:
    """After W0 updates, 'adapters off' is not the base model: a DPO reference must use a frozen copy."""
    model = tiny_llama()
    method = build_method({"name": "delta_lora", "r": 2, "warmup_steps": 0})
    method.apply(model)
    with pytest.raises(ConfigError, match="changes the base weights in place"), method.disabled(model):
        pass
