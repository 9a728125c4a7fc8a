"""Ctrl-C and SIGTERM: finish the current step, save a checkpoint, stop with a message saying how to resume.

SIGTERM is Lightning's own handler (it chains the SLURM requeue handlers when Lightning runs under SLURM, and
raises `SIGTERMException` after the batch); this callback adds the checkpoint. Ctrl-C gets a handler of its
own while training runs: the first press stops after the current step, a second one aborts without saving.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.utilities.rank_zero import rank_zero_info


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving a checkpoint."""

    def __init__(self, signum: int, checkpoint: Path, step: int) -> None:
        self.signum = signum
        self.checkpoint = checkpoint
        self.step = step
        super().__init__(
            f"interrupted by {signal.Signals(signum).name} at step {step}; checkpoint saved to {checkpoint}"
        )


class GracefulStop(pl.Callback):
    """Turns Ctrl-C / SIGTERM into: checkpoint at the end of the current step, then `TrainingInterrupted`."""

    def __init__(self, checkpoint: Path) -> None:
        self.checkpoint = Path(checkpoint)
        self.requested: int | None = None
        self.saved_step: int | None = None
        self._previous_sigint: Any = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.requested, self.saved_step = None, None
        if threading.current_thread() is threading.main_thread():
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is not None:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.requested = signal.SIGINT
        print(
            "\nCtrl-C: stopping after this step and saving a checkpoint (press Ctrl-C again to abort without "
            "saving)",
            file=sys.stderr,
            flush=True,
        )

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        signum = self.requested or (signal.SIGTERM if trainer.received_sigterm else None)
        if trainer.world_size > 1:  # every rank must stop at the same step
            stop = trainer.strategy.reduce_boolean_decision(signum is not None, all=False)
            signum = (signum or signal.SIGTERM) if stop else None
        if signum is not None:
            self._save(trainer)
            raise TrainingInterrupted(signum, self.checkpoint, trainer.global_step)

    def on_exception(self, trainer: pl.Trainer, pl_module: Any, exception: BaseException) -> None:
        # SIGTERM that arrived after this step's `on_train_batch_end`: Lightning stops at the end of the step.
        if isinstance(exception, SIGTERMException) and self.saved_step is None:
            self._save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._restore_sigint()

    def teardown(self, trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
        self._restore_sigint()

    def _save(self, trainer: pl.Trainer) -> None:
        trainer.save_checkpoint(self.checkpoint, weights_only=False)
        self.saved_step = trainer.global_step
        rank_zero_info(f"saved checkpoint {self.checkpoint} at step {trainer.global_step}")

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None
