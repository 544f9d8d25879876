"""LoRA+ against docs/METHODS.md and HF PEFT's `create_loraplus_optimizer`: the same lr per parameter."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftbench.errors import ConfigError
from peftbench.methods import build_method, check_groups_cover
from peftbench.methods.lora import LoRALinear
from tests.helpers import clone_model, tiny_llama, token_batch

LR, RATIO, WD = 1e-3, 16, 0.05


def _ours(base: nn.Module) -> tuple[nn.Module, object]:
    model = clone_model(base)
    method = build_method({"name": "lora_plus", "r": 4, "lr_ratio": RATIO})
    method.apply(model, head=model.lm_head)  # a trainable 2-D head
    model.model.norm.weight.requires_grad_(True)  # and a trainable 1-D parameter
    return model, method


def _lr_by_name(model: nn.Module, groups: list[dict]) -> dict[str, float]:
    lr = {id(p): g["lr"] for g in groups for p in g["params"]}
    return {n: lr[id(p)] for n, p in model.named_parameters() if p.requires_grad}


def test_groups_and_learning_rates() -> None:
    model, method = _ours(tiny_llama(tie=False))
    groups = method.param_groups(model, lr=LR, weight_decay=WD)
    check_groups_cover(groups, model)
    assert all(g["weight_decay"] == WD for g in groups)  # honoured in every group
    lrs = _lr_by_name(model, groups)
    for name, lr in lrs.items():
        if name.endswith("lora_B") or name == "model.norm.weight":
            assert lr == pytest.approx(LR * RATIO), name
        else:
            assert name.endswith("lora_A") or name == "lm_head.weight", name
            assert lr == LR, name
    # forward and init are LoRA's: identity at init, LoRALinear layers
    assert any(isinstance(m, LoRALinear) for m in model.modules())
    opt = torch.optim.AdamW(groups)
    batch = token_batch()
    model.train()(batch, labels=batch).loss.backward()
    opt.step()


def test_learning_rates_equal_peft_create_loraplus_optimizer() -> None:
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_loraplus_optimizer

    base = tiny_llama(tie=False)
    ours, method = _ours(base)
    reference = peft.get_peft_model(
        clone_model(base), peft.LoraConfig(r=4, lora_alpha=32, target_modules="all-linear")
    )
    for name, param in reference.named_parameters():
        if name.endswith(("lm_head.weight", "model.norm.weight")):
            param.requires_grad_(True)
    opt = create_loraplus_optimizer(
        model=reference, optimizer_cls=torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO, weight_decay=WD
    )
    theirs = {
        name.removeprefix("base_model.model.").replace(".default.weight", ""): lr
        for name, lr in _lr_by_name(reference, opt.param_groups).items()
    }
    mine = _lr_by_name(ours, method.param_groups(ours, lr=LR, weight_decay=WD))
    assert mine.keys() == theirs.keys()
    assert mine == pytest.approx(theirs)


def test_validate_rejects_a_bad_ratio() -> None:
    with pytest.raises(ConfigError, match=r"method\.lr_ratio"):
        build_method({"name": "lora_plus", "lr_ratio": 0})
