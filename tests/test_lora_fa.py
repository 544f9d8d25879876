"""LoRA-FA against docs/METHODS.md: LoRA's forward with A frozen, and a real activation-memory saving; the v2
preconditioning of B's gradient inside the optimizer step, after gradient clipping (as HF PEFT's
`create_lorafa_optimizer`), through a real `Trainer.fit`, across a resume, and against PEFT's optimizer."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from peftbench.errors import ConfigError
from peftbench.methods import build_method, check_groups_cover
from peftbench.methods.lora import LoRALinear
from peftbench.methods.lora_fa import LoRAFALinear, Preconditioner, _LoRAFABranch, precondition_grad_b
from peftbench.module import PeftModule
from tests.helpers import ROOT, bare_trainer, clone_model, tiny_llama, token_batch


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
        lambda inp, weight_b: _LoRAFABranch.apply(inp, fa.lora_A, weight_b, fa.scaling, 0.0), (x, b)
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
    """Backward leaves B's plain gradient; the optimizer's step pre-hook replaces it by
    ``g_B (A A^T + 1e-8 I)^-1 / s^2`` right before the update (SGD at lr 1: B moves by exactly that)."""
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
    torch.testing.assert_close(pre.lora_B.grad, plain.lora_B.grad, atol=0, rtol=0)  # not in backward
    a, s = plain.lora_A, plain.scaling
    expected = plain.lora_B.grad @ torch.linalg.inv(a @ a.T + 1e-8 * torch.eye(3)) / s**2
    torch.testing.assert_close(precondition_grad_b(plain.lora_B.grad, a, s), expected, atol=1e-5, rtol=1e-5)
    optimizer = torch.optim.SGD([pre.lora_B], lr=1.0)
    optimizer.register_step_pre_hook(Preconditioner([pre]))
    before = pre.lora_B.detach().clone()
    optimizer.step()
    torch.testing.assert_close(pre.lora_B.grad, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pre.lora_B.detach(), before - expected, atol=1e-5, rtol=1e-5)


def _lora_fa(precondition: bool = True, adapter_seed: int = 0) -> tuple[nn.Module, Any]:
    """tiny_llama (seed 0) with LoRA-FA (r 4, alpha 8, no dropout), A drawn under `adapter_seed`."""
    model = tiny_llama(seed=0)
    torch.manual_seed(adapter_seed)
    method = build_method(
        {"name": "lora_fa", "r": 4, "alpha": 8, "dropout": 0.0, "precondition": precondition}
    )
    method.apply(model)
    return model.train(), method


def _fa_layers(model: nn.Module) -> list[LoRAFALinear]:
    return [m for m in model.modules() if isinstance(m, LoRAFALinear)]


def test_the_hook_is_registered_once_per_optimizer() -> None:
    """`on_optimizer_built` twice on one optimizer: one hook, B's gradient projected once; a new optimizer
    (as on resume) gets its own; without `precondition` none."""
    model, method = _lora_fa()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=1.0)
    method.on_optimizer_built(model, optimizer)
    method.on_optimizer_built(model, optimizer)
    assert len(optimizer._optimizer_step_pre_hooks) == 1
    x = token_batch()
    model(x, labels=x).loss.backward()
    layers = _fa_layers(model)
    expected = [precondition_grad_b(m.lora_B.grad, m.lora_A, m.scaling) for m in layers]
    before = [m.lora_B.detach().clone() for m in layers]
    optimizer.step()
    for layer, old, step in zip(layers, before, expected, strict=True):
        torch.testing.assert_close(layer.lora_B.detach(), old - step, atol=1e-6, rtol=1e-5)
    fresh = torch.optim.SGD(trainable, lr=1.0)
    method.on_optimizer_built(model, fresh)
    assert len(fresh._optimizer_step_pre_hooks) == 1
    plain_model, plain_method = _lora_fa(precondition=False)
    plain = torch.optim.SGD([p for p in plain_model.parameters() if p.requires_grad], lr=1.0)
    plain_method.on_optimizer_built(plain_model, plain)
    assert not plain._optimizer_step_pre_hooks


# ----- through Lightning: precondition after gradient clipping ------------------------------------------
LR, CLIP, STEPS = 1e-3, 1e-2, 3


class _CausalLMTask:
    """The least a task must do for training: the causal-LM loss of a token batch."""

    primary_metric = "loss"

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        out = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["input_ids"]
        )
        return out.loss, int(batch["attention_mask"].sum())


def _batches(n: int) -> list[dict[str, torch.Tensor]]:
    ids = token_batch(batch=2 * n, length=8, seed=3)
    return [
        {"input_ids": ids[i : i + 2], "attention_mask": torch.ones_like(ids[i : i + 2])}
        for i in range(0, 2 * n, 2)
    ]


def _loader(n: int) -> DataLoader:
    rows = [{k: v[i] for k, v in batch.items()} for batch in _batches(n) for i in range(2)]
    return DataLoader(rows, batch_size=2, shuffle=False)


def _optim_config() -> Any:
    optim = OmegaConf.load(ROOT / "conf" / "optim" / "adamw.yaml")
    optim.lr, optim.warmup_ratio, optim.schedule, optim.weight_decay = LR, 0.0, "constant", 0.01
    return optim


def _trainer(**options: Any) -> L.Trainer:
    return bare_trainer(STEPS, **{"gradient_clip_val": CLIP, **options})


def _by_hand(model: nn.Module, method: Any, clip_first: bool) -> list[float]:
    """STEPS steps of forward, backward, clipping (at CLIP) and preconditioning in the order asked, then torch
    AdamW as `conf/optim/adamw.yaml` builds it; the gradient norms before clipping."""
    optim = _optim_config()
    groups = method.param_groups(model, lr=optim.lr, weight_decay=optim.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)
    trainable = [p for p in model.parameters() if p.requires_grad]
    layers = _fa_layers(model)
    norms = []
    for batch in _batches(STEPS):
        optimizer.zero_grad()
        _CausalLMTask().loss(model, batch)[0].backward()
        norms.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainable]))))
        if clip_first:
            torch.nn.utils.clip_grad_norm_(trainable, CLIP)
        with torch.no_grad():
            for layer in layers:
                layer.lora_B.grad.copy_(precondition_grad_b(layer.lora_B.grad, layer.lora_A, layer.scaling))
        if not clip_first:
            torch.nn.utils.clip_grad_norm_(trainable, CLIP)
        optimizer.step()
    return norms


def _max_difference(a: nn.Module, b: nn.Module) -> float:
    theirs = dict(b.named_parameters())
    return max(float((p - theirs[n]).abs().max()) for n, p in a.named_parameters() if p.requires_grad)


def test_precondition_follows_gradient_clipping_in_trainer_fit() -> None:
    """A real `Trainer.fit` (gradient_clip_val active at every step) ends where clip -> precondition -> AdamW
    by hand does, and not where precondition -> clip -> AdamW does (the old order: in backward). Adam's first
    step hardly depends on a common gradient scale, so the orders part from step 2 on: 3 steps."""
    model, method = _lora_fa()
    clip_first = copy.deepcopy(model)
    precondition_first = copy.deepcopy(model)
    _trainer().fit(
        PeftModule(model, method, _CausalLMTask(), _optim_config()), train_dataloaders=_loader(STEPS)
    )
    norms = _by_hand(clip_first, method, clip_first=True)
    assert min(norms) > 10 * CLIP  # clipping is active at every step
    _by_hand(precondition_first, method, clip_first=False)
    assert _max_difference(model, clip_first) < 1e-7
    assert _max_difference(model, precondition_first) > 2e-5


def test_resume_goes_on_preconditioning_after_clipping(tmp_path: Path) -> None:
    """Stopped after step 1 (an epoch of one batch) and resumed from the checkpoint on a fresh model (a new
    optimizer, its hook registered by `configure_optimizers`, once): the weights of an uninterrupted run."""

    class StopAfterOne(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
            trainer.should_stop = trainer.global_step >= 1

    whole, whole_method = _lora_fa()
    _trainer().fit(
        PeftModule(whole, whole_method, _CausalLMTask(), _optim_config()), train_dataloaders=_loader(1)
    )

    first, first_method = _lora_fa()
    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1, save_top_k=-1)
    _trainer(enable_checkpointing=True, callbacks=[saver, StopAfterOne()]).fit(
        PeftModule(first, first_method, _CausalLMTask(), _optim_config()), train_dataloaders=_loader(1)
    )
    resumed, method = _lora_fa(adapter_seed=1)  # another A: A and B come from the checkpoint
    assert not torch.equal(_fa_layers(resumed)[0].lora_A, _fa_layers(whole)[0].lora_A)
    module = PeftModule(resumed, method, _CausalLMTask(), _optim_config())
    trainer = _trainer()
    trainer.fit(module, train_dataloaders=_loader(1), ckpt_path=str(tmp_path / "last.ckpt"))
    assert trainer.global_step == STEPS
    assert len(trainer.optimizers[0]._optimizer_step_pre_hooks) == 1
    for layer, expected in zip(_fa_layers(resumed), _fa_layers(whole), strict=True):
        torch.testing.assert_close(layer.lora_A, expected.lora_A, atol=0, rtol=0)
        torch.testing.assert_close(layer.lora_B, expected.lora_B, atol=1e-7, rtol=0)


def _peft_twin_with_random_b(base: nn.Module, ours: nn.Module) -> nn.Module:
    """Draw a random B for every LoRA-FA layer of `ours`, then a PEFT LoRA on a copy of `base` holding
    the same A and B (so both sides start from one adapter)."""
    import peft

    reference = peft.get_peft_model(
        clone_model(base), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
    )
    theirs = dict(reference.named_parameters())
    with torch.no_grad():
        for name, layer in ours.named_modules():
            if isinstance(layer, LoRAFALinear):
                layer.lora_B.normal_(std=0.1)
                theirs[f"base_model.model.{name}.lora_A.default.weight"].copy_(layer.lora_A)
                theirs[f"base_model.model.{name}.lora_B.default.weight"].copy_(layer.lora_B)
    return reference


def test_clipped_training_matches_peft_create_lorafa_optimizer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same weights, batches and clipping (backward, clip_grad_norm_, step) for PEFT's LoRA-FA optimizer
    and for torch AdamW with our hook: the same B after 3 steps, and not the B of the other order. PEFT's
    optimizer is made comparable: its fp32 path (on a bf16-capable CPU it projects under bf16 autocast, which
    flips the sign of near-zero entries), eps 1e-12 on both sides (it adds eps before Adam's bias correction,
    torch after), no weight decay (it decays after the update, torch before)."""
    pytest.importorskip("peft")
    import peft.optimizers.lorafa as peft_lorafa
    from peft.optimizers import create_lorafa_optimizer

    monkeypatch.setattr(peft_lorafa, "is_bf16_available", lambda: False)
    base = tiny_llama()
    ours, method = _lora_fa()
    reference = _peft_twin_with_random_b(base, ours).train()
    theirs = dict(reference.named_parameters())
    precondition_first = copy.deepcopy(ours)
    peft_optimizer = create_lorafa_optimizer(reference, r=4, lora_alpha=8, lr=LR, weight_decay=0.0)
    peft_optimizer.param_groups[0]["eps"] = 1e-12
    our_groups = method.param_groups(ours, lr=LR, weight_decay=0.0)
    our_optimizer = torch.optim.AdamW(our_groups, lr=LR, eps=1e-12, weight_decay=0.0)
    method.on_optimizer_built(ours, our_optimizer)
    other_groups = method.param_groups(precondition_first, lr=LR, weight_decay=0.0)
    other_optimizer = torch.optim.AdamW(other_groups, lr=LR, eps=1e-12, weight_decay=0.0)
    runs = ((ours, our_optimizer), (reference, peft_optimizer), (precondition_first, other_optimizer))
    for batch in _batches(STEPS):
        for model, optimizer in runs:
            optimizer.zero_grad()
            _CausalLMTask().loss(model, batch)[0].backward()
            if model is precondition_first:
                with torch.no_grad():
                    for layer in _fa_layers(model):
                        grad = layer.lora_B.grad
                        grad.copy_(precondition_grad_b(grad, layer.lora_A, layer.scaling))
            norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], CLIP)
            assert norm > 10 * CLIP
            optimizer.step()
    ours_vs_peft = other_vs_peft = 0.0
    for name, layer in ours.named_modules():
        if isinstance(layer, LoRAFALinear):
            peft_b = theirs[f"base_model.model.{name}.lora_B.default.weight"].detach()
            other_b = precondition_first.get_submodule(name).lora_B.detach()
            ours_vs_peft = max(ours_vs_peft, float((layer.lora_B.detach() - peft_b).abs().max()))
            other_vs_peft = max(other_vs_peft, float((other_b - peft_b).abs().max()))
    assert ours_vs_peft < 1e-5  # fp32 pinv vs solve on entries with a near-zero gradient
    assert other_vs_peft > 5e-5


def test_matches_peft_lora_on_copied_weights() -> None:
    pytest.importorskip("peft")
    base = tiny_llama()
    ours = clone_model(base)
    torch.manual_seed(0)
    build_method({"name": "lora_fa", "r": 4, "alpha": 8, "dropout": 0.0}).apply(ours)
    reference = _peft_twin_with_random_b(base, ours)
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
