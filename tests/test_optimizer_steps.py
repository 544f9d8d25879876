"""The step count a method sees after each real optimizer step, through a real `Trainer.fit`.

docs/METHODS.md (Delta-LoRA, "Step counting"): step t is the number of optimizer steps done, 1 after the
first. Lightning increments `trainer.global_step` only after `LightningModule.optimizer_step` returns, so a
hook that passed `global_step` from there saw 0, 1, 2, ... and Delta-LoRA moved W0 one step late (with
``warmup_steps: 0`` the first delta was lost). These tests drive `PeftModule` through Lightning, also with
gradient accumulation and across a resume from a checkpoint, and check the numbers and the step after which
W0 first changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from peftbench.methods import build_method
from peftbench.methods.delta_lora import DeltaLoRALinear
from peftbench.module import PeftModule
from tests.helpers import ROOT, bare_trainer, tiny_llama, token_batch


class CausalLMTask:
    """The least a task must do for training: the causal-LM loss of a token batch."""

    primary_metric = "loss"

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        out = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["input_ids"]
        )
        return out.loss, int(batch["attention_mask"].sum())


def _loader(n_batches: int, batch_size: int = 2) -> DataLoader:
    ids = token_batch(batch=n_batches * batch_size, length=8, seed=3)
    rows = [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in ids]
    return DataLoader(rows, batch_size=batch_size, shuffle=False)


class StepSpy:
    """Wraps `method.after_optimizer_step`: the steps it was called with, and after which W0 had moved."""

    def __init__(self, method: Any, model: torch.nn.Module) -> None:
        self.seen: list[int] = []
        self.w0_moved_after: list[int] = []
        self._call = method.after_optimizer_step
        self._model = model
        self._w0 = self._weights()
        method.after_optimizer_step = self

    def _weights(self) -> list[torch.Tensor]:
        layers = [m for m in self._model.modules() if isinstance(m, DeltaLoRALinear)]
        assert layers
        return [m.base.weight.detach().clone() for m in layers]

    def __call__(self, model: torch.nn.Module, step: int) -> None:
        self._call(model, step)
        self.seen.append(step)
        now = self._weights()
        if any(not torch.equal(a, b) for a, b in zip(now, self._w0, strict=True)):
            self.w0_moved_after.append(step)
        self._w0 = now


class StopAfter(L.Callback):
    """Stops a 4-step run after `steps` optimizer steps (the schedule still plans 4), as an interrupt does."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.steps:
            trainer.should_stop = True


def _delta_lora(warmup_steps: int | float) -> tuple[torch.nn.Module, Any, PeftModule]:
    model = tiny_llama(seed=0).train()
    method = build_method({"name": "delta_lora", "r": 2, "alpha": 4, "warmup_steps": warmup_steps})
    method.apply(model)
    optim = OmegaConf.load(ROOT / "conf" / "optim" / "adamw.yaml")
    optim.lr = 1e-2
    optim.warmup_ratio = 0.0
    return model, method, PeftModule(model, method, CausalLMTask(), optim)


def _trainer(max_steps: int, **options: Any) -> L.Trainer:
    return bare_trainer(max_steps, **options)


@pytest.mark.parametrize(("warmup", "first_move"), [(0, 1), (2, 3)])
def test_a_method_sees_steps_done_and_w0_first_moves_after_step_k_plus_one(
    warmup: int, first_move: int
) -> None:
    model, method, module = _delta_lora(warmup)
    spy = StepSpy(method, model)
    _trainer(max_steps=4).fit(module, train_dataloaders=_loader(4))
    assert spy.seen == [1, 2, 3, 4]
    assert spy.w0_moved_after == list(range(first_move, 5))


def test_gradient_accumulation_counts_optimizer_steps_not_batches() -> None:
    model, method, module = _delta_lora(1)
    spy = StepSpy(method, model)
    _trainer(max_steps=3, accumulate_grad_batches=2).fit(module, train_dataloaders=_loader(6))
    assert spy.seen == [1, 2, 3]
    assert spy.w0_moved_after == [2, 3]


def test_fractional_warmup_counts_from_the_first_step() -> None:
    """``warmup_steps: 0.25`` of a 4-step run is K = 1: W0 moves after steps 2, 3 and 4."""
    model, method, module = _delta_lora(0.25)
    spy = StepSpy(method, model)
    _trainer(max_steps=4).fit(module, train_dataloaders=_loader(4))
    assert spy.w0_moved_after == [2, 3, 4]


def test_a_resumed_run_goes_on_counting_and_ends_where_an_uninterrupted_one_does(tmp_path: Path) -> None:
    # uninterrupted: 4 steps over 2 epochs of 2 batches
    whole_model, whole_method, whole = _delta_lora(2)
    whole_spy = StepSpy(whole_method, whole_model)
    _trainer(max_steps=4).fit(whole, train_dataloaders=_loader(2))
    assert whole_spy.seen == [1, 2, 3, 4]
    assert whole_spy.w0_moved_after == [3, 4]

    # interrupted after step 2 (an epoch boundary), then resumed from the checkpoint on a fresh model
    first_model, first_method, first = _delta_lora(2)
    first_spy = StepSpy(first_method, first_model)
    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1, save_top_k=-1)
    _trainer(max_steps=4, enable_checkpointing=True, callbacks=[saver, StopAfter(2)]).fit(
        first, train_dataloaders=_loader(2)
    )
    assert first_spy.seen == [1, 2] and first_spy.w0_moved_after == []

    model, method, resumed = _delta_lora(2)
    spy = StepSpy(method, model)
    _trainer(max_steps=4).fit(resumed, train_dataloaders=_loader(2), ckpt_path=str(tmp_path / "last.ckpt"))
    assert spy.seen == [3, 4]
    assert spy.w0_moved_after == [3, 4]
    expected = dict(whole_model.named_parameters())
    for name, param in model.named_parameters():
        assert torch.equal(param, expected[name]), name
