"""SIGINT / SIGTERM: a run stops at the end of the current optimizer step, with a checkpoint.

During training a signal only asks the run to stop: `StopOnInterrupt` writes `last.ckpt` after the optimizer
step during which it arrived and raises `RunInterrupted` (recorded as `status: interrupted`, exit code
128 + signal). Outside training, or on a second signal, `RunInterrupted` is raised at once. A validation
pass stops at once too (the run resumes from its last checkpoint).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


class RunInterrupted(BaseException):
    """SIGINT / SIGTERM: the run stopped; `checkpoint` is where it can resume from (None: none written).

    A BaseException so no `except Exception` on the way swallows it."""

    def __init__(self, signum: int, step: int | None = None, checkpoint: Path | None = None) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        where = f" at step {step}" if step is not None else ""
        saved = f"; checkpoint {checkpoint}" if checkpoint else ""
        super().__init__(f"interrupted by {signal.Signals(signum).name}{where}{saved}")

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


class Interrupts:
    """SIGINT/SIGTERM handlers: during training (`deferred`) a signal only asks the run to stop after the
    current optimizer step; otherwise, or on a second signal, `RunInterrupted` is raised at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.deferred = False
        self.trainer: L.Trainer | None = None  # the training run to stop (set while it trains)
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        self.signum, self.deferred = None, False
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}
        self.deferred, self.trainer = False, None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first = self.signum is None
        self.signum = signum
        if self.deferred and first:
            # Lightning's own SIGTERM handler (it runs first) would stop the loop with a SystemExit after
            # the current batch, before a checkpoint: StopOnInterrupt stops it, with one, instead
            connector = getattr(self.trainer, "_signal_connector", None)
            if connector is not None and hasattr(connector, "received_sigterm"):
                connector.received_sigterm = False
            log.warning(
                "received %s: stopping after this training step and writing a checkpoint (send it again to "
                "stop at once)",
                signal.Signals(signum).name,
            )
            return
        raise RunInterrupted(signum)


INTERRUPTS = Interrupts()


class StopOnInterrupt(Callback):
    """After the optimizer step during which a signal arrived: write `last` (the path of the last checkpoint;
    None: no checkpoints), raise RunInterrupted."""

    def __init__(self, last: Path | None) -> None:
        self.last = last

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        INTERRUPTS.deferred, INTERRUPTS.trainer = True, trainer

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        INTERRUPTS.deferred, INTERRUPTS.trainer = False, None

    def on_exception(self, trainer: L.Trainer, pl_module: Any, exception: BaseException) -> None:
        INTERRUPTS.deferred, INTERRUPTS.trainer = False, None

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, i: int) -> None:
        if trainer.fit_loop.epoch_loop._should_accumulate():
            return  # mid-accumulation: stop only where an optimizer step has just completed
        stop = INTERRUPTS.signum is not None
        if trainer.world_size > 1:  # every rank stops after the same step (and joins the same save)
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        if self.last is not None:
            trainer.save_checkpoint(self.last)
        raise RunInterrupted(INTERRUPTS.signum or signal.SIGTERM, trainer.global_step, self.last)

    def on_validation_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        # a validation pass can take minutes: stop now; the run resumes from its last checkpoint
        if INTERRUPTS.signum is not None and trainer.world_size == 1:
            raise RunInterrupted(INTERRUPTS.signum, trainer.global_step, None)


@contextlib.contextmanager
def stop_as_interrupt(trainer: L.Trainer, last: Path | None) -> Iterator[None]:
    """Around `trainer.fit`: a SystemExit / KeyboardInterrupt caused by a signal becomes RunInterrupted
    (Lightning turns SIGTERM during validation into SystemExit)."""
    try:
        yield
    except (SystemExit, KeyboardInterrupt):
        if INTERRUPTS.signum is None:
            raise
        raise RunInterrupted(INTERRUPTS.signum, trainer.global_step, last) from None
