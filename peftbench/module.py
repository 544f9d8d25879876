"""The one LightningModule: trains any method on any task, without knowing which.

It asks the method for its parameter groups and calls its after-step hook; it asks the task for the loss,
the per-example values of each evaluation batch and, at the end of the pass, their aggregate. There is no
branch on a method's or a task's name here.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from typing import Any

import lightning as L
import torch
from torch import nn

from peftbench.compiling import compile_in_place
from peftbench.memory import peak_bytes, reset_peak
from peftbench.methods.base import PeftMethod, check_groups_cover
from peftbench.optim import build_optimizer, lr_lambda
from peftbench.tasks.stepping import StepContext, steps_optimizer_itself


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/inf: stop at that step, say where and what to try."""

    def __init__(self, step: int, history: list[tuple[int, float]], lr: float) -> None:
        last = f"{history[-1][1]:.4f} at step {history[-1][0]}" if history else "none (first step)"
        super().__init__(
            f"non-finite loss at step {step} (last finite loss: {last}); likely cause: the learning rate "
            f"optim.lr={lr} is too high for this method, or fp16 overflow: lower optim.lr, use bf16 or "
            "fp32 precision, or clip gradients (trainer.gradient_clip_val)"
        )
        self.step = step


#: the key under which the module keeps its own bookkeeping in a Lightning checkpoint
CHECKPOINT_KEY = "peftbench_module"


class PeftModule(L.LightningModule):
    """Fine-tunes `model` with `method` on `task`; logs `train/loss`, `val/*`, `test/*`, tokens/s, memory.

    Checkpoints hold only what the method needs (`method.adapter_state_dict`: trainable tensors plus its
    extra state), never the frozen base, so `strict_loading` is off: the base comes from `model` itself.
    """

    #: a checkpoint's `state_dict` holds the adapter only (see `on_save_checkpoint`)
    strict_loading = False

    def __init__(
        self, model: nn.Module, method: PeftMethod, task: Any, optim: Any, compile: bool = False
    ) -> None:
        super().__init__()
        self.compile_model = compile  # trainer.compile: torch.compile the model in place (configure_model)
        self.compiled: list[str] = []  # what compile_in_place compiled
        self.model = model
        self.method = method
        self.task = task
        self.optim = optim
        self.loss_history: list[tuple[int, float]] = []
        self.val_history: list[dict[str, float]] = []
        self.train_tokens = 0
        self.train_seconds = 0.0
        self.peak_train_bytes = 0
        self._step_started = 0.0
        self._pending_loss: torch.Tensor | None = None  # this batch's loss, until it is recorded
        self._scores: dict[str, list[Any]] = defaultdict(list)  # the pass's per-example values, by key
        self._losses: list[tuple[float, int]] = []
        # a task that steps the optimizer itself (tasks/stepping.py: RL's rollouts and minibatch epochs)
        # runs under Lightning's manual optimization; gradient clipping is then done here, with the value
        # `train.py` takes out of the Trainer's arguments (Lightning refuses it under manual optimization)
        self.automatic_optimization = not steps_optimizer_itself(task)
        self.manual_clip: tuple[float | None, str | None] = (None, None)
        self.step_stats: list[dict[str, float]] = []  # a stepping task's per-batch statistics (the record)

    def configure_model(self) -> None:
        """`trainer.compile=true`: compile the model's blocks in place, once (Lightning calls this before
        every fit/validate/test), with the method's layers attached; names and checkpoints unchanged."""
        if self.compile_model and not self.compiled:
            self.compiled = compile_in_place(self.model)

    # ----- training ---------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        # from_pretrained and a test-before-training pass leave the model in eval mode; Lightning keeps a
        # module's mode, so training mode (adapter dropout) is set here, before its fit loop checks it
        self.model.train()

    def on_train_start(self) -> None:
        self.model.train()
        reset_peak(self.device)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_started = time.perf_counter()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if not self.automatic_optimization:  # the task steps the optimizer itself (tasks/stepping.py)
            loss, tokens = self.task.training_step(self._step_context(), batch)
        else:
            loss, _ = self.task.loss(self.model, batch)
            tokens = int(batch["attention_mask"].sum())
        if not torch.isfinite(loss):
            raise NonFiniteLossError(self.global_step, self.loss_history, self.optim.lr)
        self.train_tokens += tokens
        self._pending_loss = loss.detach()
        self.log("train/loss", loss, prog_bar=True, on_step=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def _record_batch(self) -> None:
        """Book the finished batch (loss, time, memory) once: at its `on_train_batch_end`, or earlier when a
        checkpoint callback saves in the same hook (callbacks run before the module's hook)."""
        if self._pending_loss is None:
            return
        self.train_seconds += time.perf_counter() - self._step_started
        loss = self._pending_loss
        if self.trainer.world_size > 1:  # every rank books this batch: the mean over ranks (what DDP trains)
            loss = self.trainer.strategy.reduce(loss.clone(), reduce_op="mean")
        self.loss_history.append((self.global_step, float(loss)))
        self.peak_train_bytes = max(self.peak_train_bytes, peak_bytes(self.device))
        self._pending_loss = None

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._record_batch()
        if self.train_seconds > 0:
            self.log("train/tokens_per_s", self.train_tokens / self.train_seconds, on_step=True)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.after_real_optimizer_step()

    def after_real_optimizer_step(self, steps_done: int | None = None) -> None:
        """Tell the method that one more optimizer step is done, with the count of steps done (1 after the
        first). Lightning increments `trainer.global_step` only after `optimizer_step` returns, so inside it
        the count is ``global_step + 1`` (docs/METHODS.md, Delta-LoRA, "Step counting"). Under manual
        optimization the count has already moved when the step returns: `manual_optimizer_step` passes it."""
        count = self.trainer.global_step + 1 if steps_done is None else steps_done
        self.method.after_optimizer_step(self.model, count)

    # ----- a task that steps the optimizer itself (manual optimization) --------------------------------
    def _step_context(self) -> StepContext:
        return StepContext(
            model=self.model,
            steps_done=int(self.trainer.global_step),
            rank=int(self.trainer.global_rank),
            world_size=int(self.trainer.world_size),
            optimizer_step=self.manual_optimizer_step,
            log=self.log_step_stats,
        )

    def manual_optimizer_step(self, loss: torch.Tensor) -> None:
        """One real optimizer step from `loss`, as the automatic path takes it: backward, gradient clipping
        (`trainer.gradient_clip_val`, kept in `manual_clip`), the step (optimizer hooks such as LoRA-FA's
        run inside it), the scheduler's step, then the method's `after_optimizer_step` with the count."""
        if not torch.isfinite(loss):
            raise NonFiniteLossError(self.global_step, self.loss_history, self.optim.lr)
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        clip_value, clip_algorithm = self.manual_clip
        if clip_value:
            self.clip_gradients(
                optimizer, gradient_clip_val=clip_value, gradient_clip_algorithm=clip_algorithm or "norm"
            )
        optimizer.step()
        optimizer.zero_grad()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        self.after_real_optimizer_step(int(self.trainer.global_step))

    def log_step_stats(self, stats: Any) -> None:
        """Log a batch's statistics as `train/<key>` and keep them (with the step) for the record."""
        values = {str(k): float(v) for k, v in stats.items()}
        self.step_stats.append({"step": float(self.global_step), **values})
        for key, value in values.items():
            self.log(f"train/{key}", value, on_step=True, batch_size=1)

    def configure_optimizers(self) -> dict[str, Any]:
        groups = self.method.param_groups(self.model, lr=self.optim.lr, weight_decay=self.optim.weight_decay)
        check_groups_cover(groups, self.model)
        optimizer = build_optimizer(groups, self.optim)
        self.method.on_optimizer_built(self.model, optimizer)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        self.method.plan_training(total)
        warmup = math.ceil(self.optim.warmup_ratio * total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(self.optim.schedule, total, warmup)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----- checkpoints ------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only the adapter (trainable tensors + the method's extra state) and the run's bookkeeping:
        the frozen base is rebuilt from the model config on resume, never written."""
        self._record_batch()
        adapter = self.method.adapter_state_dict(self.model)
        checkpoint["state_dict"] = {f"model.{k}": v for k, v in adapter.items()}
        checkpoint[CHECKPOINT_KEY] = {
            "loss_history": [(int(s), float(v)) for s, v in self.loss_history],
            "val_history": [dict(h) for h in self.val_history],
            "train_tokens": int(self.train_tokens),
            "train_seconds": float(self.train_seconds),
            "peak_train_bytes": int(self.peak_train_bytes),
            "step_stats": [dict(s) for s in self.step_stats],
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Load the adapter through the method (its checks and its state sync, e.g. Delta-LoRA's A_t, B_t)
        and restore the bookkeeping, so the record of a resumed run is complete."""
        state = checkpoint.get("state_dict", {})
        adapter = {k.removeprefix("model."): v for k, v in state.items()}
        self.method.load_adapter_state_dict(self.model, adapter)
        checkpoint["state_dict"] = {}  # loaded above; Lightning has nothing left to load
        saved = checkpoint.get(CHECKPOINT_KEY, {})
        self.loss_history = [(int(s), float(v)) for s, v in saved.get("loss_history", [])]
        self.val_history = [dict(h) for h in saved.get("val_history", [])]
        self.train_tokens = int(saved.get("train_tokens", 0))
        self.train_seconds = float(saved.get("train_seconds", 0.0))
        self.peak_train_bytes = int(saved.get("peak_train_bytes", 0))
        self.step_stats = [dict(s) for s in saved.get("step_stats", [])]

    # ----- evaluation -------------------------------------------------------------------------------
    def _eval_step(self, batch: dict[str, Any]) -> None:
        loss, n_tokens = self.task.loss(self.model, batch)
        self._losses.append((float(loss), n_tokens))
        for key, values in self.task.evaluate(self.model, batch).items():
            self._scores[key] += values

    def _eval_epoch_end(self, prefix: str) -> dict[str, float]:
        """The pass's metrics: the task aggregates the per-example values gathered over the whole pass
        (`Task.aggregate`: means, or corpus-level metrics such as macro-F1), plus the token-weighted loss."""
        passed = {k: v for k, v in self._scores.items() if v}
        metrics = {f"{prefix}/{k}": float(v) for k, v in self.task.aggregate(passed).items()}
        tokens = sum(n for _, n in self._losses)
        if tokens:
            metrics[f"{prefix}/loss"] = sum(loss * n for loss, n in self._losses) / tokens
        self._scores.clear()
        self._losses.clear()
        for key, value in metrics.items():
            self.log(key, value, prog_bar=key.endswith(self.task.primary_metric))
        return metrics

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        metrics = self._eval_epoch_end("val")
        if not self.trainer.sanity_checking:
            self.val_history.append({"step": self.global_step, **metrics})

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")
