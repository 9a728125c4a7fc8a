"""`python -m sdtune.train +experiment=NAME [overrides]`: validate → build → fit → export."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from sdtune.config import ConfigError, resolve_resume, validate
from sdtune.data.records import DataError
from sdtune.distributed import (
    FinalCheckpointInChildren,
    apply_batch_semantics,
    batch_semantics,
    cluster_plugins,
    save_final_checkpoint,
)
from sdtune.run import RunDirError, ensure_fresh_run_dir, requeue_checkpoint

USER_ERRORS = (ConfigError, DataError, RunDirError)


@dataclass
class Run:
    """A finished training job."""

    run_dir: Path
    module: Any
    trainer: pl.Trainer


def train(cfg: DictConfig) -> Run:
    """Run one training job described by a composed `train.yaml`."""
    from sdtune.conditioning import build_conditioning
    from sdtune.models import load_stack
    from sdtune.models.adapters import apply_method
    from sdtune.module import DiffusionModule

    validate(cfg)
    run_dir = Path(cfg.paths.output_dir)
    ensure_fresh_run_dir(run_dir)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data, cache_dir=cfg.paths.cache_dir)
    datamodule.prepare_data()
    datamodule.setup("fit")  # every bad sample is reported here, before any model loads

    stack = load_stack(cfg.model, Path(cfg.paths.cache_dir))
    apply_method(stack, cfg.method)
    module = DiffusionModule(stack, build_conditioning(cfg.conditioning, stack), cfg.method, cfg.loss)

    loggers = build_loggers(cfg)
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    last_ckpt = run_dir / "checkpoints" / "last.ckpt"
    callbacks.append(FinalCheckpointInChildren(str(last_ckpt)))
    trainer = instantiate(
        cfg.trainer,
        default_root_dir=str(run_dir),
        callbacks=callbacks,
        logger=loggers or False,
        plugins=cluster_plugins(),
    )
    apply_batch_semantics(cfg, trainer)
    # A requeued SLURM job continues from what its previous attempt saved, whatever `resume` says.
    ckpt_path = requeue_checkpoint(run_dir) or resolve_resume(cfg.resume)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    save_final_checkpoint(trainer, last_ckpt)
    if trainer.is_global_zero:
        finish(cfg, module, trainer, datamodule, run_dir)
    return Run(run_dir, module, trainer)


def build_loggers(cfg: DictConfig) -> list[Any]:
    """The configured logger (none when `logger=none`), with the resolved config logged to it."""
    if not cfg.logger:
        return []
    logger = instantiate(cfg.logger)
    logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return [logger]


def finish(cfg: DictConfig, module: Any, trainer: pl.Trainer, datamodule: Any, run_dir: Path) -> None:
    """Rank 0: export the trained weights in the configured formats and write the manifest."""
    from sdtune.formats.exporters import export_formats
    from sdtune.run import write_manifest

    exports = export_formats(module, run_dir, list(cfg.export.formats))
    write_manifest(
        run_dir,
        base_model=module.stack.base_model,
        global_step=trainer.global_step,
        world_size=trainer.world_size,
        method=cfg.method.name,
        exports=exports,
        extra={
            "num_train_images": datamodule.num_samples,
            "skipped_samples": len(datamodule.skipped),
            "effective_batch_size": batch_semantics(trainer, cfg.data.batch_size).effective,
        },
    )
    for logger in trainer.loggers:
        _log_artifact(logger, run_dir, exports)


def _log_artifact(logger: Any, run_dir: Path, exports: list[dict[str, str]]) -> None:
    from pytorch_lightning.loggers import WandbLogger

    if not isinstance(logger, WandbLogger) or not exports:
        return
    import wandb

    artifact = wandb.Artifact(name=f"lora-{logger.experiment.id}", type="lora")
    for export in exports:
        artifact.add_file(str(run_dir / export["path"]))
    logger.experiment.log_artifact(artifact)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        run = train(cfg)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    if run.trainer.is_global_zero:
        print(run.run_dir)


if __name__ == "__main__":
    main()
