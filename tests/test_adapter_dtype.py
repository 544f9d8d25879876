"""Trainable adapter tensors are fp32 on any base (docs/METHODS.md, LoRA, "Adapter dtype").

On a bf16 model (or a 4-bit base with bf16 compute) the adapters keep fp32 master weights, gradients and
optimizer state and are cast to the compute dtype inside the forward. With bf16 masters, one AdamW step at
lr 1e-4 leaves most entries unchanged (an update of 1e-4 is below half a bf16 step for entries above
~0.05); with fp32 masters a tiny update reaches every element. The virtual-token methods have their own
test (tests/test_prompt_tuning.py, tests/test_prefix_tuning.py); full, partial, BitFit and LN tuning train
the base's own tensors, which keep the model's dtype (use fp32 weights with bf16-mixed precision there).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from peftbench.methods import build_method
from tests.helpers import tiny_llama, token_batch

#: methods whose trainable tensors are adapter tensors, with small settings for the tiny model
ADAPTER_METHODS: dict[str, dict[str, Any]] = {
    "lora": {"r": 4},
    "lora_plus": {"r": 4},
    "lora_fa": {"r": 4},
    "delta_lora": {"r": 4, "warmup_steps": 0},
    "dora": {"r": 4},
    "pissa": {"r": 4},
    "vera": {"r": 8},
    "ia3": {},
    "adapter": {"bottleneck_size": 8},
}


def _perturb_and_step(model: torch.nn.Module, method: Any, lr: float) -> dict[str, torch.Tensor]:
    """Move every trainable tensor off its init (so every entry gets a gradient), then one AdamW step;
    returns the tensors before the step."""
    generator = torch.Generator().manual_seed(5)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for param in trainable.values():
            noise = torch.randn(param.shape, generator=generator) * 0.1
            param.add_(noise.to(param.dtype))
    groups = method.param_groups(model, lr=lr, weight_decay=0.0)
    optimizer = torch.optim.AdamW(groups)
    before = {n: p.detach().clone() for n, p in trainable.items()}
    batch = token_batch()
    out = model(batch, labels=batch)
    out.loss.backward()
    optimizer.step()
    method.after_optimizer_step(model, 1)
    return before


@pytest.mark.parametrize("name", sorted(ADAPTER_METHODS))
def test_a_bf16_model_trains_fp32_adapters_and_a_tiny_update_reaches_every_element(name: str) -> None:
    model = tiny_llama(seed=0).to(torch.bfloat16).train()
    method = build_method({"name": name, **ADAPTER_METHODS[name]})
    method.apply(model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    assert {p.dtype for p in trainable.values()} == {torch.float32}, {
        n: p.dtype for n, p in trainable.items()
    }
    before = _perturb_and_step(model, method, lr=1e-4)
    for param_name, param in trainable.items():
        assert param.grad is not None and param.grad.dtype == torch.float32, param_name
        unchanged = (param.detach() == before[param_name]).float().mean().item()
        assert unchanged == 0.0, f"{param_name}: {unchanged:.0%} of the entries did not move"
    with torch.no_grad():
        assert model(token_batch()).logits.dtype == torch.bfloat16  # the forward computes in bf16


def test_qlora_adapters_are_fp32_over_a_4bit_base_with_bf16_compute() -> None:
    from tests.test_qlora import llama64

    model = llama64().train()
    method = build_method({"name": "qlora", "r": 4, "compute_dtype": "bfloat16", "dropout": 0.0})
    method.apply(model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert {p.dtype for p in trainable.values()} == {torch.float32}
    before = _perturb_and_step(model, method, lr=1e-4)
    for param_name, param in trainable.items():
        unchanged = (param.detach() == before[param_name]).float().mean().item()
        assert unchanged == 0.0, f"{param_name}: {unchanged:.0%} of the entries did not move"


def test_fp32_models_compute_exactly_as_before() -> None:
    """On an fp32 model the cast is a no-op: the LoRA branch is the same tensor operations as ever."""
    from peftbench.methods.lora import compute_copy

    x = torch.randn(2, 3)
    weight = torch.randn(4, 3)
    assert compute_copy(weight, x) is weight
    assert compute_copy(weight, x.to(torch.bfloat16)).dtype == torch.bfloat16
