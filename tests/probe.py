"""Test-only instrumentation for multi-process training runs, added on the command line with
`+callbacks.probe._target_=tests.probe.Probe +callbacks.probe.out=<dir>` (the tests put the repository on
PYTHONPATH, so every rank — local, forked, srun'd, submitit'd — can import it).

Every rank writes `<out>/rank<global rank>.pt` at the end of training: its trainable weights, its step count,
a hash of every sample it trained on, and the gradients of the first optimizer step (after DDP's averaging).
Rank 0 writes `<out>/progress` (the step count) after every step, then waits `step_delay` seconds.

`per_sample_seeds=true` makes every sample's randomness (VAE posterior sample, caption dropout, noise,
timestep) a function of (global step, the sample's position in the global batch) only: then a run with
N ranks × batch b and one with 1 rank × batch N·b draw the same numbers, and so do a run interrupted and
resumed from a checkpoint and one that ran straight through. Sampling positions are rank·b + j.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from sdtune.io import atomic_write_text


class Probe(pl.Callback):
    def __init__(self, out: str, per_sample_seeds: bool = False, step_delay: float = 0.0) -> None:
        self.out = Path(out)
        self.per_sample_seeds = per_sample_seeds
        self.step_delay = step_delay
        self.batches: list[dict[str, Any]] = []
        self.first_grads: dict[str, torch.Tensor] = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        if self.per_sample_seeds:
            pl_module.training_step = _seeded_per_sample(trainer, pl_module.training_step)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        hashes = [hashlib.sha1(x.cpu().numpy().tobytes()).hexdigest()[:16] for x in batch["pixel_values"]]
        self.batches.append({"epoch": trainer.current_epoch, "step": trainer.global_step, "samples": hashes})

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        if trainer.global_step == 0 and not self.first_grads:  # averaged over ranks (DDP), before clipping
            self.first_grads = {
                k: v.grad.detach().cpu().clone() for k, v in pl_module.trainable_parameters().items()
            }

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        if trainer.is_global_zero:
            atomic_write_text(self.out / "progress", str(trainer.global_step))
        time.sleep(self.step_delay)  # a window in which a test's signal arrives before the next step

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        state = {
            "global_rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "params": {k: v.detach().cpu().clone() for k, v in pl_module.trainable_parameters().items()},
            "batches": self.batches,
            "first_grads": self.first_grads,
        }
        torch.save(state, self.out / f"rank{trainer.global_rank}.pt")


def _seeded_per_sample(trainer: pl.Trainer, training_step: Any) -> Any:
    def step(batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        size = len(batch["caption"])
        losses = []
        for j in range(size):
            torch.manual_seed(1_000_003 * trainer.global_step + trainer.global_rank * size + j)
            losses.append(training_step({k: v[j : j + 1] for k, v in batch.items()}, batch_idx))
        return torch.stack(losses).mean()

    return step
