"""Fixed-seed sample grids every N steps and at the end, saved as PNG and sent to the logger.

With an EMA of the weights (method=full) the samples show the averaged weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger

from sdtune.callbacks.ema import averaged_weights
from sdtune.io import atomic_path
from sdtune.sampling import make_grid, to_pil


class SampleCallback(pl.Callback):
    """Samples `sampling.prompts` with fixed seeds; rank 0 alone writes `samples/step_XXXXXX.png`.

    With `sampling.from_data: N` the samples are conditioned on the first N training samples instead (their
    caption, map, source image or vector; N = 2 when null and the conditioning takes more than text);
    conditions that can be shown stand left of each generated image.
    """

    def __init__(self, run_dir: str, sampling: DictConfig, resolution: int) -> None:
        self.out = Path(run_dir) / "samples"
        self.sampling = sampling
        self.resolution = resolution
        self.last_step = -1

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        every = self.sampling.every_n_steps
        if every and trainer.global_step % every == 0 and trainer.global_step != self.last_step:
            self.sample(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if trainer.global_step != self.last_step:
            self.sample(trainer, pl_module)

    def sample(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.last_step = trainer.global_step
        if not trainer.is_global_zero or not self.sampling.prompts:
            return
        per_prompt = self.sampling.per_prompt
        from_data = self.sampling.from_data
        if from_data is None:
            from_data = 2 if pl_module.conditioning.inputs else 0
        if from_data:
            batch = repeat_batch(trainer.datamodule.condition_batch(from_data), per_prompt)
            prompts = list(batch["caption"])
        else:
            prompts = [p for p in OmegaConf.to_container(self.sampling.prompts) for _ in range(per_prompt)]
            batch = {"caption": prompts}
        batch["negative_caption"] = [self.sampling.negative_prompt] * len(prompts)
        with averaged_weights(trainer, pl_module):
            images = to_pil(pl_module.sample(batch, self.sampling, self.resolution))
        shown = pl_module.conditioning.visualize(batch)  # e.g. the colourised map, per sample
        if shown:
            images = [
                make_grid([*conditions, image], columns=len(conditions) + 1)
                for conditions, image in zip(shown, images)
            ]
        grid = make_grid(images, columns=self.sampling.per_prompt)
        self.out.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.out / f"step_{trainer.global_step:06d}.png") as tmp:
            grid.save(tmp, format="PNG")
        for logger in trainer.loggers:
            _log_images(logger, images, prompts, trainer.global_step)


def repeat_batch(batch: dict[str, Any], times: int) -> dict[str, Any]:
    """Each sample of `batch` `times` times in a row (one grid row per sample)."""
    import torch

    return {
        key: value.repeat_interleave(times, dim=0)
        if isinstance(value, torch.Tensor)
        else [v for v in value for _ in range(times)]
        for key, value in batch.items()
    }


def _log_images(logger: Any, images: list[Image.Image], captions: list[str], step: int) -> None:
    if isinstance(logger, WandbLogger):
        logger.log_image(key="samples", images=images, caption=captions, step=step)
    elif isinstance(logger, TensorBoardLogger):
        import numpy as np

        for i, (image, caption) in enumerate(zip(images, captions)):
            logger.experiment.add_image(f"samples/{i}: {caption}", np.asarray(image), step, dataformats="HWC")
