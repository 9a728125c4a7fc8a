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
from sdtune.distributed import (
    FinalCheckpointInChildren,
    apply_batch_semantics,
    batch_semantics,
    cluster_plugins,
    save_final_checkpoint,
)
from sdtune.io import atomic_write_text
from sdtune.losses import NonFiniteLossError
from sdtune.redact import redact
from sdtune.run import RunDirError, ensure_fresh_run_dir, requeue_checkpoint

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
    from sdtune import perf
    from sdtune.callbacks.resume import ResumeState
    from sdtune.checkpoint import AtomicCheckpointIO
    from sdtune.conditioning import build_conditioning
    from sdtune.models import load_stack
    from sdtune.models.adapters import apply_method, apply_noise_schedule
    from sdtune.resume import dataset_change, read_checkpoint
    from sdtune.run import record_data

    validate(cfg)
    perf.configure_process(cfg.runtime, cfg.trainer)
    run_dir = Path(cfg.paths.output_dir)
    ensure_fresh_run_dir(run_dir)
    save_config(cfg, run_dir)
    pl.seed_everything(cfg.seed, workers=True)
    resume = resolve_resume(cfg.resume)
    resumed = read_checkpoint(resume, cfg.model.allow_pickle) if resume else None  # refuses untrusted pickles
    datamodule = instantiate(cfg.data, cache_dir=cfg.paths.cache_dir)
    datamodule.prepare_data()
    datamodule.setup("fit")  # every bad sample is reported here, before any model loads
    record_data(run_dir, datamodule)
    changed = dataset_change(resume, resumed, datamodule) if resume else None  # reported, not fatal

    stack = load_stack(cfg.model, Path(cfg.paths.cache_dir))
    perf.quantize_base(stack, cfg.runtime)
    conditioning = build_conditioning(cfg.conditioning, stack)
    datamodule.prepare_with_model(stack, conditioning, cfg.trainer.accelerator)  # DreamBooth class images
    apply_method(stack, cfg.method)
    apply_noise_schedule(stack, cfg.method, cfg.loss)
    conditioning.train_widened_input(stack.unet)  # peft adapters freeze everything else they find
    perf.apply_runtime(stack, cfg.runtime)
    module = build_module(stack, conditioning, cfg)
    check_exports(cfg, module, datamodule, run_dir)

    loggers = build_loggers(cfg)
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    callbacks += perf.prepare_training(cfg, datamodule, module)  # latent/text cache, built here once
    last = run_dir / "checkpoints" / "last.ckpt"
    callbacks += [ResumeState(), GracefulStop(last), FinalCheckpointInChildren(str(last))]
    trainer = instantiate(
        cfg.trainer,
        default_root_dir=str(run_dir),
        callbacks=callbacks,
        logger=loggers or False,
        plugins=cluster_plugins() or None,  # Lightning 2.4 refuses an empty list
    )
    trainer.strategy.checkpoint_io = AtomicCheckpointIO(cfg.model.allow_pickle)
    apply_batch_semantics(cfg, trainer)
    # A requeued SLURM job continues from what its previous attempt saved, whatever `resume` says.
    ckpt_path = requeue_checkpoint(run_dir) or resume
    try:
        fit(trainer, module, datamodule, ckpt_path, last)
        if trainer.is_global_zero:
            facts = {
                "dataset_fingerprint": (getattr(datamodule, "summary", None) or {}).get("fingerprint"),
                "resumed_from": str(resume) if resume else None,
                "dataset_changed_since_resume": changed,
            }
            finish(cfg, module, trainer, datamodule, run_dir, facts)
    except BaseException:
        close_wandb(loggers, completed=False)
        raise
    close_wandb(loggers, completed=True)
    return Run(run_dir, module, trainer)


def fit(trainer: pl.Trainer, module: Any, datamodule: Any, ckpt_path: Any, last: Path) -> None:
    """Train, then save the final checkpoint (every rank takes part)."""
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:  # Lightning's own stop after the step; GracefulStop saved the checkpoint
        raise TrainingInterrupted(signal.SIGTERM, last, trainer.global_step) from None
    save_final_checkpoint(trainer, last)


def close_wandb(loggers: list[Any], completed: bool) -> None:
    """End this job's W&B run. Left open, the next job in the same process (a Hydra sweep with the basic
    launcher, a notebook) would be logged into it: Lightning reuses a W&B run that is still in progress."""
    from pytorch_lightning.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger._experiment.finish(exit_code=0 if completed else 1)


def build_module(stack: Any, conditioning: Any, cfg: DictConfig) -> pl.LightningModule:
    """The LightningModule of the method: the autoencoder's (stage one) or the denoiser's (all others)."""
    if cfg.method.name == "vae":
        from sdtune.autoencoder import AutoencoderModule

        return AutoencoderModule(stack, conditioning, cfg.method)
    from sdtune.module import DiffusionModule

    return DiffusionModule(stack, conditioning, cfg.method, cfg.loss)


def check_exports(cfg: DictConfig, module: Any, datamodule: Any, run_dir: Path) -> None:
    """Refuse, before training, export formats that cannot hold what this run trains."""
    if cfg.method.name == "vae":
        return
    from sdtune.formats.exporters import rehearse_exports

    problems = rehearse_exports(export_context(cfg, module, datamodule, run_dir), list(cfg.export.formats))
    if problems:
        raise ConfigError(problems)


def export_context(
    cfg: DictConfig, module: Any, datamodule: Any, run_dir: Path, steps: int | None = None
) -> Any:
    """What the exporters need; `steps` = the optimizer steps trained (None before training)."""
    from sdtune.formats.exporters import context_from_module
    from sdtune.formats.training_metadata import training_metadata

    return context_from_module(
        module,
        name=run_dir.name,
        resolution=cfg.data.resolution,
        num_train_images=datamodule.num_samples,
        dtype=cfg.export.get("dtype"),
        training=training_metadata(cfg, steps),
    )


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
    logger.log_hyperparams(redact(OmegaConf.to_container(cfg, resolve=True)))
    return [logger]


def finish(
    cfg: DictConfig, module: Any, trainer: pl.Trainer, datamodule: Any, run_dir: Path, facts: dict[str, Any]
) -> None:
    """Rank 0: export the weights (the EMA average if kept) in each configured format; write the manifest."""
    from sdtune.callbacks.ema import averaged_weights
    from sdtune.formats.exporters import export_run
    from sdtune.run import write_manifest

    with averaged_weights(trainer if cfg.export.ema else None, module) as ema_exported:
        exports = export_run(
            export_context(cfg, module, datamodule, run_dir, trainer.global_step),
            run_dir,
            list(cfg.export.formats),
        )
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
            "ema_exported": ema_exported,
            "effective_batch_size": batch_semantics(trainer, cfg.data.batch_size).effective,
        },
    )
    for logger in trainer.loggers:
        _log_artifact(logger, run_dir, exports, cfg.method.name)


def _log_artifact(logger: Any, run_dir: Path, exports: list[dict[str, str]], method: str) -> None:
    from pytorch_lightning.loggers import WandbLogger

    if not isinstance(logger, WandbLogger) or not exports:
        return
    import wandb

    kind = "lora" if method == "lora" else "model"
    artifact = wandb.Artifact(name=f"{method}-{logger.experiment.id}", type=kind)
    for export in exports:
        path = run_dir / export["path"]
        if path.is_dir():  # a full pipeline is gigabytes: referenced where it lies, not uploaded
            artifact.add_reference(path.resolve().as_uri(), name=export["format"])
        else:
            artifact.add_file(str(path))
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
    if run.trainer.is_global_zero:
        print(run.run_dir)


if __name__ == "__main__":
    main()
