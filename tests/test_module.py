"""The Lightning module trains in training mode: adapter dropout is active in every training step, even
after `from_pretrained` (eval mode) and a test-before-training pass, and evaluation runs in eval mode."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import OmegaConf

from peftbench.methods import build_method
from peftbench.module import PeftModule
from peftbench.tasks import ClassificationTask


class DropoutModes(L.Callback):
    """Records, per training / test batch, whether every dropout module was in training mode."""

    def __init__(self) -> None:
        self.train: list[bool] = []
        self.test: list[bool] = []

    @staticmethod
    def _all_training(module: L.LightningModule) -> bool:
        dropouts = [m for m in module.modules() if isinstance(m, torch.nn.Dropout)]
        assert dropouts, "the LoRA adapter (dropout > 0) adds dropout modules"
        return all(m.training for m in dropouts)

    def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
        self.train.append(self._all_training(module))

    def on_test_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int, *_: Any) -> None:
        self.test.append(any(m.training for m in module.modules()))


def test_training_steps_run_in_training_mode_after_an_eval_pass(
    tiny_model_and_tokenizer: tuple[Any, Any], tmp_path: Path
) -> None:
    import copy

    model, tokenizer = copy.deepcopy(tiny_model_and_tokenizer[0]), tiny_model_and_tokenizer[1]
    model.eval()  # as from_pretrained leaves it
    path = tmp_path / "two.csv"
    path.write_text("text,category\n" + "".join(f"review {i},{'ab'[i % 2]}\n" for i in range(24)))
    task = ClassificationTask(data_files=str(path), label_words=["bad", "good"], split={"val": 2, "test": 4})
    task.probe = None
    task.setup(tokenizer, seed=0)
    task.head(model)
    method = build_method({"name": "lora", "r": 2, "dropout": 0.1})
    method.apply(model)
    optim = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "optim" / "adamw.yaml")
    module = PeftModule(model, method, task, optim)
    modes = DropoutModes()
    trainer = L.Trainer(
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[modes],
    )
    trainer.test(module, dataloaders=task.test_dataloader(2), verbose=False)  # the untuned score
    trainer.fit(module, train_dataloaders=task.train_dataloader(2))
    trainer.test(module, dataloaders=task.test_dataloader(2), verbose=False)
    assert modes.train == [True, True, True]
    assert modes.test and not any(modes.test)
