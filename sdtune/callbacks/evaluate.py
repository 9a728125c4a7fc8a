"""Judge the shapes-world prompt set during training (`evaluation.every_n_steps`), like a validation loop.

Each evaluation writes `eval/step_XXXXXX.json` + `.png` in the run directory and logs `eval/<field>`
accuracies to the loggers. With an EMA of the weights (method=full) the averaged weights are judged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from sdtune.callbacks.ema import averaged_weights


class EvaluateCallback(pl.Callback):
    """Rank 0 generates and judges `settings`' prompt set every N steps and at the end (N = 0: never)."""

    def __init__(self, run_dir: str, settings: DictConfig, resolution: int) -> None:
        self.out = Path(run_dir) / "eval"
        self.settings = settings
        self.resolution = resolution
        self.last_step = -1
        self.judge: Any = None

    @property
    def enabled(self) -> bool:
        return bool(self.settings.every_n_steps)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        step = trainer.global_step
        if self.enabled and step % self.settings.every_n_steps == 0 and step != self.last_step:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if self.enabled and trainer.global_step != self.last_step:
            self.evaluate(trainer, pl_module)

    def evaluate(self, trainer: pl.Trainer, pl_module: Any) -> None:
        from sdtune.evaluation import evaluate, summary_line, write_report
        from sdtune.judge import Judge

        self.last_step = trainer.global_step
        if not trainer.is_global_zero:
            return
        self.judge = self.judge or Judge.load()
        was_training = pl_module.training
        pl_module.eval()
        try:
            with averaged_weights(trainer, pl_module), torch.no_grad():
                report, images = evaluate(
                    pl_module.unet,
                    pl_module.vae,
                    pl_module.conditioning,
                    pl_module.stack.scheduler_config,
                    self.settings,
                    self.resolution,
                    self.judge,
                )
        finally:
            pl_module.train(was_training)
        report["step"] = trainer.global_step
        write_report(report, images, self.out, f"step_{trainer.global_step:06d}")
        pl_module.print(f"evaluation at step {trainer.global_step}: {summary_line(report)}")
        metrics = {f"eval/{k}": v for k, v in report["overall"].items() if k != "n" and v is not None}
        if "map_iou" in report:
            metrics["eval/map_iou"] = report["map_iou"]["mean"]
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
