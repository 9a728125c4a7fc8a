"""`python -m sdtune.train +experiment=NAME [overrides]`: validate → build → fit → export."""

from __future__ import annotations

import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities.exceptions import SIGTERMException

from sdtune.callbacks.interrupt import GracefulStop, TrainingInterrupted
from sdtune.checkpoint import CheckpointWriteError, UntrustedFileError
from sdtune.config import ConfigError, resolve_resume, validate
from sdtune.data.records import DataError
from sdtune.losses import NonFiniteLossError
from sdtune.redact import redact
from sdtune.run import RunDirError, ensure_fresh_run_dir

USER_ERRORS = (
    ConfigError,
    DataError,
    RunDirError,
    NonFiniteLossError,
    UntrustedFileError,
    CheckpointWriteError,
)


@dataclass
class Run:
    """A finished training job."""

    run_dir: Path
    module: Any
    trainer: pl.Trainer


def train(cfg: DictConfig) -> Run:
    """Run one training job described by a composed `train.yaml`."""
    from sdtune.callbacks.resume import ResumeState
    from sdtune.checkpoint import AtomicCheckpointIO
    from sdtune.conditioning import build_conditioning
    from sdtune.models import load_stack
    from sdtune.models.adapters import apply_method
    from sdtune.module import DiffusionModule
    from sdtune.resume import dataset_change, read_checkpoint
    from sdtune.run import record_data

    validate(cfg)
    run_dir = Path(cfg.paths.output_dir)
    ensure_fresh_run_dir(run_dir)
    pl.seed_everything(cfg.seed, workers=True)
    resume = resolve_resume(cfg.resume)
    resumed = read_checkpoint(resume, cfg.model.allow_pickle) if resume else None  # refuses untrusted pickles
    datamodule = instantiate(cfg.data, cache_dir=cfg.paths.cache_dir)
    datamodule.prepare_data()
    datamodule.setup("fit")  # every bad sample is reported here, before any model loads
    record_data(run_dir, datamodule)
    changed = dataset_change(resume, resumed, datamodule) if resume else None  # reported, not fatal

    stack = load_stack(cfg.model, Path(cfg.paths.cache_dir))
    apply_method(stack, cfg.method)
    module = DiffusionModule(stack, build_conditioning(cfg.conditioning, stack), cfg.method, cfg.loss)

    loggers = build_loggers(cfg)
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    last = run_dir / "checkpoints" / "last.ckpt"
    callbacks += [ResumeState(), GracefulStop(last)]
    trainer = instantiate(
        cfg.trainer, default_root_dir=str(run_dir), callbacks=callbacks, logger=loggers or False
    )
    trainer.strategy.checkpoint_io = AtomicCheckpointIO(cfg.model.allow_pickle)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
    except SIGTERMException:  # Lightning's own stop after the step; GracefulStop saved the checkpoint
        raise TrainingInterrupted(signal.SIGTERM, last, trainer.global_step) from None
    if not last.exists():  # normally written at the final step by callbacks.checkpoint
        trainer.save_checkpoint(last, weights_only=False)
    if trainer.is_global_zero:
        facts = {
            "dataset_fingerprint": (getattr(datamodule, "summary", None) or {}).get("fingerprint"),
            "resumed_from": str(resume) if resume else None,
            "dataset_changed_since_resume": changed,
        }
        finish(cfg, module, trainer, datamodule, run_dir, facts)
    return Run(run_dir, module, trainer)


def build_loggers(cfg: DictConfig) -> list[Any]:
    """The configured logger (none when `logger=none`), with the resolved config logged to it."""
    if not cfg.logger:
        return []
    logger = instantiate(cfg.logger)
    logger.log_hyperparams(redact(OmegaConf.to_container(cfg, resolve=True)))
    return [logger]


def finish(
    cfg: DictConfig, module: Any, trainer: pl.Trainer, datamodule: Any, run_dir: Path, facts: dict[str, Any]
) -> None:
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
            **facts,
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
    except TrainingInterrupted as stop:
        from hydra.core.hydra_config import HydraConfig

        from sdtune.resume import resume_command

        command = resume_command(Path(cfg.paths.output_dir), list(HydraConfig.get().overrides.task))
        print(f"{stop}\nto continue this run: {command}", file=sys.stderr)
        raise SystemExit(128 + stop.signum) from None
    except KeyboardInterrupt:  # Ctrl-C before training started (checks, loading): nothing to save yet
        print("interrupted before training started; nothing was saved", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None
    print(run.run_dir)


if __name__ == "__main__":
    main()
