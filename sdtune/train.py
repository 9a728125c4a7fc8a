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
from sdtune.io import atomic_write_text
from sdtune.run import RunDirError, ensure_fresh_run_dir

USER_ERRORS = (ConfigError, DataError, RunDirError)


@dataclass
class Run:
    """A finished training job."""

    run_dir: Path
    module: Any
    trainer: pl.Trainer


def train(cfg: DictConfig) -> Run:
    """Run one training job described by a composed `train.yaml`."""
    from sdtune import perf
    from sdtune.conditioning import build_conditioning
    from sdtune.models import load_stack
    from sdtune.models.adapters import apply_method
    from sdtune.module import DiffusionModule

    validate(cfg)
    perf.configure_process(cfg.runtime, cfg.trainer)
    run_dir = Path(cfg.paths.output_dir)
    ensure_fresh_run_dir(run_dir)
    save_config(cfg, run_dir)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data, cache_dir=cfg.paths.cache_dir)
    datamodule.prepare_data()
    datamodule.setup("fit")  # every bad sample is reported here, before any model loads

    stack = load_stack(cfg.model, Path(cfg.paths.cache_dir))
    perf.quantize_base(stack, cfg.runtime)
    apply_method(stack, cfg.method)
    perf.apply_runtime(stack, cfg.runtime)
    module = DiffusionModule(stack, build_conditioning(cfg.conditioning, stack), cfg.method, cfg.loss)

    loggers = build_loggers(cfg)
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    callbacks += perf.prepare_training(cfg, datamodule, module)  # latent/text cache, built here once
    trainer = instantiate(
        cfg.trainer, default_root_dir=str(run_dir), callbacks=callbacks, logger=loggers or False
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=resolve_resume(cfg.resume))
    trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    if trainer.is_global_zero:
        finish(cfg, module, trainer, datamodule, run_dir)
    return Run(run_dir, module, trainer)


def save_config(cfg: DictConfig, run_dir: Path) -> None:
    """Keep the config in `.hydra/config.yaml` also when training is started from Python, not the CLI."""
    path = run_dir / ".hydra" / "config.yaml"
    if not path.exists():
        plain = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        atomic_write_text(path, OmegaConf.to_yaml(plain))


def build_loggers(cfg: DictConfig) -> list[Any]:
    """The configured logger (none when `logger=none`), with the resolved config logged to it."""
    if not cfg.logger:
        return []
    logger = instantiate(cfg.logger)
    logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return [logger]


def finish(cfg: DictConfig, module: Any, trainer: pl.Trainer, datamodule: Any, run_dir: Path) -> None:
    """Rank 0: export the trained weights in the configured formats and write the manifest."""
    from sdtune.formats.exporters import context_from_module, export_run
    from sdtune.run import write_manifest

    ctx = context_from_module(
        module, name=run_dir.name, resolution=cfg.data.resolution, num_train_images=datamodule.num_samples
    )
    exports = export_run(ctx, run_dir, list(cfg.export.formats))
    write_manifest(
        run_dir,
        base_model=module.stack.base_model,
        global_step=trainer.global_step,
        world_size=trainer.world_size,
        method=cfg.method.name,
        exports=exports,
        extra={"num_train_images": datamodule.num_samples, "skipped_samples": len(datamodule.skipped)},
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
        path = run_dir / export["path"]
        if path.is_dir():
            artifact.add_dir(str(path), name=export["path"])
        else:
            artifact.add_file(str(path), name=export["path"])
    logger.experiment.log_artifact(artifact)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        run = train(cfg)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    print(run.run_dir)


if __name__ == "__main__":
    main()
