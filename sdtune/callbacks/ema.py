"""An exponential moving average (EMA) of the trained weights, kept through checkpoints and resume.

The averaging itself is diffusers' `EMAModel`. At the u-th update (one every `update_every` optimizer steps)
each averaged weight moves as

    ema ← d·ema + (1 − d)·w,   d = 0 for u = 1 (a copy), then min(decay, u / (u + 9)) with warmup, else decay

so early in training, when the weights move fast, the average follows them closely.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytorch_lightning as pl
from torch import Tensor

from sdtune.config import ConfigError

DEVICES = ("same", "cpu")


class EMACallback(pl.Callback):
    """Averages every trainable parameter of the module; the average goes into checkpoints.

    Use `averaged_weights(trainer, module)` to run code (sampling, export) with the averaged weights in place.
    """

    def __init__(
        self, decay: float = 0.9999, warmup: bool = True, update_every: int = 1, device: str = "same"
    ) -> None:
        if device not in DEVICES:
            raise ValueError(f"method.ema.device: {device!r} is not one of {', '.join(DEVICES)}")
        self.decay = decay
        self.warmup = warmup
        self.update_every = update_every
        self.device = device
        self.ema: Any = None  # diffusers.training_utils.EMAModel, built at fit start
        self.names: list[str] = []
        self._pending: dict[str, Any] | None = None  # checkpoint state, loaded before the weights exist
        self._last_step: int | None = None

    # ---- Lightning hooks --------------------------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.start(pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._last_step = trainer.global_step  # restored by now when resuming

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        step = trainer.global_step
        if step == self._last_step:  # no optimizer step in this batch (gradient accumulation)
            return
        self._last_step = step
        if step % self.update_every == 0:
            self.update(pl_module)

    def state_dict(self) -> dict[str, Any]:
        if self.ema is None:
            return dict(self._pending or {})
        return {
            "updates": self.ema.optimization_step,
            "shadow": dict(zip(self.names, self.ema.shadow_params)),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks before the module reaches its device; apply at fit start.
        self._pending = state_dict
        if self.ema is not None:
            self._apply(state_dict)

    # ---- the average ------------------------------------------------------------------------------------

    def start(self, pl_module: Any) -> None:
        """Begin averaging the module's trainable parameters (from their current values)."""
        from diffusers.training_utils import EMAModel

        params = _averaged(pl_module)
        self.names = list(params)
        # min_decay = decay turns diffusers' warmup ramp min(decay, u/(u+9)) into a constant decay.
        self.ema = EMAModel(
            list(params.values()), decay=self.decay, min_decay=0.0 if self.warmup else self.decay
        )
        if self.device == "cpu":
            self.ema.to(device="cpu")
        if self._pending:
            self._apply(self._pending)

    def update(self, pl_module: Any) -> None:
        """One EMA update from the module's current weights."""
        current = _averaged(pl_module)
        params = [current[name] for name in self.names]
        if self.device == "cpu" and params and params[0].device.type != "cpu":
            # diffusers' --offload_ema: average beside the weights, keep the result in host memory.
            self.ema.to(device=params[0].device)
            self.ema.step(params)
            self.ema.to(device="cpu")
        else:
            self.ema.step(params)

    @property
    def updates(self) -> int:
        return self.ema.optimization_step if self.ema is not None else 0

    @contextlib.contextmanager
    def swapped_in(self, pl_module: Any) -> Iterator[None]:
        """Run the block with the averaged weights in the module; the trained ones come back after."""
        params = self._params(pl_module)
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield
        finally:
            self.ema.restore(params)

    def _params(self, pl_module: Any) -> list[Tensor]:
        named = dict(pl_module.named_parameters())
        return [named[name] for name in self.names]

    def _apply(self, state: dict[str, Any]) -> None:
        shadow = state["shadow"]
        if list(shadow) != self.names:
            raise ConfigError(
                [
                    "resume: the checkpoint's EMA tracks other weights than this run trains "
                    f"({len(shadow)} vs {len(self.names)} tensors); resume with the run's method settings"
                ]
            )
        # The freshly started average already sits where it should live (cpu, or beside each weight).
        current = dict(zip(self.names, self.ema.shadow_params))
        self.ema.shadow_params = [tensor.to(current[name].device) for name, tensor in shadow.items()]
        self.ema.optimization_step = int(state["updates"])
        self._pending = None


def _averaged(pl_module: Any) -> dict[str, Tensor]:
    # Under bf16-true the fp32 master weights: an average kept in bf16 would round its small steps away.
    full = getattr(pl_module, "full_precision_weights", None)
    return full() if full is not None else pl_module.trainable_parameters()


def find_ema(trainer: pl.Trainer | None) -> EMACallback | None:
    """The trainer's EMA callback, if it has a started one."""
    for callback in trainer.callbacks if trainer is not None else []:
        if isinstance(callback, EMACallback) and callback.ema is not None:
            return callback
    return None


@contextlib.contextmanager
def averaged_weights(trainer: pl.Trainer | None, pl_module: Any) -> Iterator[bool]:
    """Run the block with the EMA weights in `pl_module` if the trainer keeps an EMA; yields whether so."""
    ema = find_ema(trainer)
    if ema is None:
        yield False
        return
    with ema.swapped_in(pl_module):
        yield True
