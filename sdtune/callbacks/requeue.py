"""SLURM preemption: checkpoint at a step boundary on SIGUSR1, requeue the job, resume in the next attempt."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from sdtune.distributed import under_slurm

log = logging.getLogger(__name__)


class Requeued(SystemExit):
    """This attempt of the SLURM job ends here; the requeued attempt resumes from the saved checkpoint."""


class SlurmRequeue(pl.Callback):
    """On SLURM, `signal` (SIGUSR1: `--signal=SIGUSR1@90` before the time limit, or `scancel -s USR1`) makes
    every rank save `<run dir>/hpc_ckpt_<n>.ckpt` after the current optimizer step, then rank 0 requeues the
    job (`scontrol requeue`) and the attempt ends. The next attempt finds the checkpoint
    (`sdtune.run.requeue_checkpoint`) and trains on to the same `trainer.max_steps`.

    The signal handler only sets a flag; the ranks agree on it after each optimizer step (one all-reduce of a
    boolean), so the checkpoint is consistent (not taken inside a backward pass or optimizer update) and every
    rank saves at the same step. Outside SLURM this callback does nothing.
    """

    def __init__(self, signal: str = "SIGUSR1") -> None:
        self.signum = _signal_number(signal)
        self.requested = False
        self._previous_handler: Any = None
        self._installed = False
        self._last_step = -1

    def setup(self, trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
        if stage != "fit" or not under_slurm() or self._installed:
            return
        self._previous_handler = signal.signal(self.signum, self._on_signal)
        self._installed = True

    def teardown(self, trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
        if self._installed:
            signal.signal(self.signum, self._previous_handler)
            self._installed = False

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.requested = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        if not self._installed or trainer.global_step == self._last_step:
            return  # not on SLURM, or inside a gradient-accumulation cycle
        self._last_step = trainer.global_step
        if not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        path = trainer.strategy.broadcast(str(next_hpc_checkpoint(Path(trainer.default_root_dir))), src=0)
        trainer.save_checkpoint(path)
        requeued = trainer.strategy.broadcast(requeue_job() if trainer.is_global_zero else False, src=0)
        if not requeued:
            self.requested = False
            if not trainer.is_global_zero:
                return
            log.warning(
                "saved %s at step %d but could not requeue the job: training goes on; if the job ends "
                "before it finishes, submit again with resume=%s",
                path,
                trainer.global_step,
                path,
            )
            return
        if trainer.is_global_zero:
            log.info("saved %s at step %d and requeued the job; this attempt ends", path, trainer.global_step)
        raise Requeued(0)


def next_hpc_checkpoint(run_dir: Path) -> Path:
    """`run_dir/hpc_ckpt_<n>.ckpt` with n one above the highest present (Lightning's naming)."""
    numbers = [int(m.group(1)) for p in run_dir.glob("hpc_ckpt_*.ckpt") if (m := _HPC.fullmatch(p.name))]
    return run_dir / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt"


def requeue_job() -> bool:
    """`scontrol requeue` this job (this element of an array job); True if SLURM accepted it."""
    array_id, task_id = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job_id = f"{array_id}_{task_id}" if array_id and task_id else os.environ.get("SLURM_JOB_ID", "")
    if not re.fullmatch(r"[0-9_]+", job_id):
        log.warning("cannot requeue: no SLURM job id in the environment")
        return False
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        log.warning("scontrol requeue %s failed: %s", job_id, error)
        return False
    if result.returncode != 0:
        log.warning("scontrol requeue %s failed: %s", job_id, result.stderr.strip())
        return False
    return True


_HPC = re.compile(r"hpc_ckpt_(\d+)\.ckpt")


def _signal_number(name: str) -> signal.Signals:
    try:
        return signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]
    except KeyError:
        raise ValueError(f"callbacks.requeue.signal: unknown signal {name!r}; e.g. SIGUSR1") from None
