"""LoRA+ against docs/METHODS.md and HF PEFT's `create_loraplus_optimizer`: the same lr and weight decay per
parameter (biases and normalisation layers without weight decay), but the user's weight decay elsewhere."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftbench.errors import ConfigError
from peftbench.methods import build_method, check_groups_cover
from peftbench.methods.lora import LoRALinear
from tests.helpers import clone_model, tiny_llama, token_batch
from tests.virtual_token_checks import tiny_bert_classifier

LR, RATIO, WD = 1e-3, 16, 0.05


def _ours(base: nn.Module) -> tuple[nn.Module, object]:
    model = clone_model(base)
    method = build_method({"name": "lora_plus", "r": 4, "lr_ratio": RATIO})
    method.apply(model, head=model.lm_head)  # a trainable 2-D head
    model.model.norm.weight.requires_grad_(True)  # and a trainable 1-D parameter
    return model, method


def _by_name(model: nn.Module, groups: list[dict], key: str = "lr") -> dict[str, float]:
    """`key` (lr, weight_decay) of every trainable parameter's group, by parameter name."""
    value = {id(p): g[key] for g in groups for p in g["params"]}
    return {n: value[id(p)] for n, p in model.named_parameters() if p.requires_grad}


def _lr_by_name(model: nn.Module, groups: list[dict]) -> dict[str, float]:
    return _by_name(model, groups, "lr")


def _peft_names(values: dict[str, float]) -> dict[str, float]:
    """PEFT's parameter names as ours: no `base_model.model.` prefix, no `.default.weight` adapter suffix."""
    return {n.removeprefix("base_model.model.").replace(".default.weight", ""): v for n, v in values.items()}


def test_groups_and_learning_rates() -> None:
    model, method = _ours(tiny_llama(tie=False))
    groups = method.param_groups(model, lr=LR, weight_decay=WD)
    check_groups_cover(groups, model)
    # the user's weight decay on every weight, none on the normalisation layer's (RMSNorm) weight
    decay = _by_name(model, groups, "weight_decay")
    assert decay.pop("model.norm.weight") == 0.0
    assert set(decay.values()) == {WD}
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
    theirs = _peft_names(_lr_by_name(reference, opt.param_groups))
    groups = method.param_groups(ours, lr=LR, weight_decay=WD)
    mine = _lr_by_name(ours, groups)
    assert mine.keys() == theirs.keys()
    assert mine == pytest.approx(theirs)
    # weight decay: PEFT's helper gives its `loraplus_weight_decay` (0 by default) to every parameter but
    # biases and nn.LayerNorm's; its layer-norm test misses LlamaRMSNorm, whose weight it decays. Here every
    # normalisation layer is exempt (module doc of peftbench/methods/lora_plus.py), so that weight differs.
    opt = create_loraplus_optimizer(
        model=reference,
        optimizer_cls=torch.optim.AdamW,
        lr=LR,
        loraplus_lr_ratio=RATIO,
        loraplus_weight_decay=WD,
    )
    their_decay = _peft_names(_by_name(reference, opt.param_groups, "weight_decay"))
    my_decay = _by_name(ours, groups, "weight_decay")
    assert (their_decay.pop("model.norm.weight"), my_decay.pop("model.norm.weight")) == (WD, 0.0)
    assert my_decay == their_decay


def _bert_pair(base: nn.Module) -> tuple[nn.Module, object, nn.Module]:
    """LoRA+ on q/v of `tiny_bert_classifier` (ours and PEFT's), each with the classifier (weight and bias)
    and every LayerNorm (weight and bias) trainable."""
    peft = pytest.importorskip("peft")
    ours = clone_model(base)
    method = build_method(
        {"name": "lora_plus", "r": 4, "lr_ratio": RATIO, "target_modules": ["query", "value"]}
    )
    method.apply(ours, head=ours.classifier)
    reference = peft.get_peft_model(
        clone_model(base), peft.LoraConfig(r=4, lora_alpha=32, target_modules=["query", "value"])
    )
    for model in (ours, reference):
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.requires_grad_(True)
    for name, param in reference.named_parameters():
        if ".classifier." in name:
            param.requires_grad_(True)
    return ours, method, reference


@pytest.mark.parametrize("weight_decay", [WD, 0.0])
def test_weight_decay_per_parameter_equals_peft_on_a_layernorm_classifier(weight_decay: float) -> None:
    """BERT with a classifier head: biases (the head's, the LayerNorms') and LayerNorm weights get no weight
    decay, every other trainable parameter the user's, with PEFT's lr: per parameter, the groups of PEFT's
    `create_loraplus_optimizer` (given the user's weight decay as `loraplus_weight_decay`)."""
    from peft.optimizers import create_loraplus_optimizer

    ours, method, reference = _bert_pair(tiny_bert_classifier())
    groups = method.param_groups(ours, lr=LR, weight_decay=weight_decay)
    check_groups_cover(groups, ours)
    opt = create_loraplus_optimizer(
        model=reference,
        optimizer_cls=torch.optim.AdamW,
        lr=LR,
        loraplus_lr_ratio=RATIO,
        loraplus_weight_decay=weight_decay,
    )
    for key in ("lr", "weight_decay"):
        mine, theirs = _by_name(ours, groups, key), _peft_names(_by_name(reference, opt.param_groups, key))
        assert mine.keys() == theirs.keys(), key
        assert mine == pytest.approx(theirs), key
    decay = _by_name(ours, groups, "weight_decay")
    exempt = {n for n in decay if n.endswith("bias") or "LayerNorm" in n}
    assert {"classifier.bias", "bert.embeddings.LayerNorm.weight"} <= exempt  # the exemption matters here
    assert all(decay[n] == 0.0 for n in exempt)
    assert all(decay[n] == weight_decay for n in decay.keys() - exempt)
    assert {n for n in decay.keys() - exempt if not n.endswith(("lora_A", "lora_B"))} == {"classifier.weight"}
    # and AdamW applies it: a step with zero gradients moves only the decayed weights
    optimizer = torch.optim.AdamW(groups)
    before = {n: p.detach().clone() for n, p in ours.named_parameters() if p.requires_grad}
    for param in ours.parameters():
        if param.requires_grad:
            param.grad = torch.zeros_like(param)
    optimizer.step()
    for name, param in ours.named_parameters():
        if param.requires_grad:
            factor = 1 - _by_name(ours, groups)[name] * decay[name]
            torch.testing.assert_close(param.detach(), before[name] * factor, rtol=1e-6, atol=0)


def test_validate_rejects_a_bad_ratio() -> None:
    with pytest.raises(ConfigError, match=r"method\.lr_ratio"):
        build_method({"name": "lora_plus", "lr_ratio": 0})
