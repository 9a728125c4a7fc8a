"""Exact resume: RNG states in the checkpoint, and a final checkpoint a resume can continue from exactly.

Lightning restores weights, optimizer, LR schedule and loop progress; the data position follows from that
(`sdtune.data.sampler`). What it does not keep is the global RNG state (noise, timesteps, caption dropout):
`ResumeState` snapshots it after every training batch and restores it when a resumed run starts training.
Everything it stores is tensors and plain Python values, so checkpoints load with `weights_only=True`.
`Checkpoint` writes `last.ckpt` at the end of the final step, a state a resume continues from exactly.

Lightning writes checkpoints from rank 0: every rank restores rank 0's RNG state. That matches a fresh run,
where `seed_everything` gives every rank the same seed.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_warn

log = logging.getLogger(__name__)


def capture_rng() -> dict[str, Any]:
    """The global RNG states of torch (CPU and CUDA), numpy and Python, as weights-only-loadable values."""
    version, mt_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": {"version": version, "state": list(mt_state), "gauss": gauss},
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            log.warning("CUDA device count changed since the checkpoint; CUDA RNG states not restored")
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


class ResumeState(pl.Callback):
    """Keeps the global RNG states in checkpoints: snapshot after each batch, restored as training starts."""

    def __init__(self) -> None:
        self.snapshot: dict[str, Any] | None = None
        self.world_size: int | None = None
        self.to_restore: dict[str, Any] | None = None
        self.resumed_world_size: int | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.world_size = trainer.world_size
        if self.resumed_world_size not in (None, trainer.world_size):
            rank_zero_warn(
                f"resuming a run trained on {self.resumed_world_size} process(es) with {trainer.world_size}: "
                "the step count, optimizer and LR schedule continue; the global batch size and the data "
                "order within the current epoch change, so the result differs from an uninterrupted run"
            )
        if self.to_restore is not None:
            restore_rng(self.to_restore)
            self.to_restore = None
        self.snapshot = capture_rng()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        self.snapshot = capture_rng()

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.snapshot or capture_rng(), "world_size": self.world_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.to_restore = state_dict["rng"]
        self.resumed_world_size = state_dict.get("world_size")


class Checkpoint(ModelCheckpoint):
    """`ModelCheckpoint` that also writes `last` at the end of the final step.

    Lightning's own `save_last` otherwise writes it after training ends, when the epoch is already marked
    finished: a resume from that state would not continue the epoch where it was.
    """

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args)
        final = trainer.global_step >= trainer.max_steps and not trainer.fit_loop._should_accumulate()
        if final and self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
