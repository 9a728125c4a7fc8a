"""Config validation that collects every problem and reports them at once, before any expensive work."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

PREDICTION_TYPES = ("epsilon", "v_prediction")
OPTIMIZERS = ("adamw", "adamw8bit")
LR_SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
)


class ConfigError(ValueError):
    """Invalid configuration: one entry per problem, each naming the key and the fix."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} configuration problem(s):\n{lines}")


def default_precision() -> str:
    """bf16 mixed precision on a GPU that supports it, full fp32 elsewhere."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("sdtune_precision"):
        OmegaConf.register_new_resolver("sdtune_precision", default_precision)


register_resolvers()


def resolve_resume(resume: str | None) -> Path | None:
    """The checkpoint file that `resume` (a run directory or a checkpoint) designates."""
    if resume is None:
        return None
    path = Path(resume).expanduser()
    return path / "checkpoints" / "last.ckpt" if path.is_dir() else path


def validate(cfg: DictConfig) -> None:
    """Raise one ConfigError listing every problem in `cfg` (a composed `train.yaml`)."""
    problems: list[str] = []
    checks = (
        _check_model,
        _check_method,
        _check_data,
        _check_trainer,
        _check_loss,
        _check_sampling,
        _check_export,
        _check_runtime,
    )
    for check in checks:
        check(cfg, problems.append)
    resume = resolve_resume(cfg.get("resume"))
    if resume is not None and not resume.is_file():
        problems.append(
            f"resume: {resume} does not exist; give a run directory with checkpoints/last.ckpt "
            "or a checkpoint file"
        )
    if problems:
        raise ConfigError(problems)


Report = Callable[[str], None]


def _check_model(cfg: DictConfig, report: Report) -> None:
    from sdtune.models.loading import FAMILIES, classify_source

    model = cfg.model
    if model.family not in FAMILIES:
        report(f"model.family: {model.family!r} is not one of {', '.join(FAMILIES)}")
    elif model.family == "sdxl":
        report("model.family: SDXL is not supported yet; use model=sd15, model=sd21 or model=tiny")
    if classify_source(model.pretrained) == "missing":
        report(
            f"model.pretrained: {model.pretrained!r} does not exist; give a hub id (org/name), a local "
            "diffusers folder, or a single-file .safetensors/.ckpt checkpoint"
        )
    config = model.get("config")
    if config and config.startswith((".", "/", "~")) and not Path(config).expanduser().is_dir():
        report(
            f"model.config: folder {config!r} does not exist; give a local diffusers folder of the same "
            "architecture"
        )


def _check_method(cfg: DictConfig, report: Report) -> None:
    method = cfg.method
    if method.name == "lora":
        for key in ("rank", "alpha"):
            value = method[key]
            if not isinstance(value, (int, float)) or value <= 0:
                report(f"method.{key}: must be a positive number, got {value!r}")
        if not isinstance(method.rank, int):
            report(f"method.rank: must be an integer, got {method.rank!r}")
        if not method.target_modules:
            report(
                "method.target_modules: must list at least one module name, e.g. [to_q, to_k, to_v, to_out.0]"
            )
        if not 0 <= method.dropout < 1:
            report(f"method.dropout: must be in [0, 1), got {method.dropout}")
        init_from = method.get("init_from")
        if init_from is not None and not Path(init_from).expanduser().is_file():
            report(f"method.init_from: LoRA file {init_from!r} does not exist")
    else:
        report(f"method.name: unknown method {method.name!r}; use method=lora")
    if method.optimizer not in OPTIMIZERS:
        report(f"method.optimizer: {method.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    if not method.lr > 0:
        report(f"method.lr: must be positive, got {method.lr}")
    if method.lr_scheduler not in LR_SCHEDULERS:
        report(f"method.lr_scheduler: {method.lr_scheduler!r} is not one of {', '.join(LR_SCHEDULERS)}")
    if method.lr_warmup_steps < 0:
        report(f"method.lr_warmup_steps: must be >= 0, got {method.lr_warmup_steps}")


def _check_data(cfg: DictConfig, report: Report) -> None:
    data = cfg.data
    if not isinstance(data.resolution, int) or data.resolution <= 0 or data.resolution % 8:
        report(f"data.resolution: must be a positive multiple of 8, got {data.resolution!r}")
    if not isinstance(data.batch_size, int) or data.batch_size < 1:
        report(f"data.batch_size: must be an integer >= 1, got {data.batch_size!r}")
    root, hf_name = data.get("root"), data.get("hf_name")
    if data.name == "captions" and root is None and hf_name is None:
        report(
            "data.root: required for data=captions; give an image folder (data.root=/my/images) "
            "or a Hugging Face dataset (data.hf_name=...)"
        )
    if root is not None and hf_name is None and not Path(root).expanduser().is_dir():
        report(f"data.root: folder {root!r} does not exist")
    for name, component in (cfg.get("conditioning") or {}).items():
        if not 0 <= component.get("dropout", 0) <= 1:
            report(f"conditioning.{name}.dropout: must be in [0, 1], got {component.dropout}")


def _check_trainer(cfg: DictConfig, report: Report) -> None:
    trainer = cfg.trainer
    if not isinstance(trainer.max_steps, int) or trainer.max_steps <= 0:
        report(f"trainer.max_steps: must be a positive integer, got {trainer.max_steps!r}")
    if trainer.accumulate_grad_batches < 1:
        report(f"trainer.accumulate_grad_batches: must be >= 1, got {trainer.accumulate_grad_batches}")
    on_cpu = trainer.accelerator == "cpu" or (trainer.accelerator == "auto" and not torch.cuda.is_available())
    if on_cpu and str(trainer.precision).startswith("16"):
        report("trainer.precision: fp16 mixed precision needs a GPU; on CPU use 32-true or bf16-mixed")
    if trainer.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        report("trainer.accelerator: no CUDA GPU is visible; use trainer.accelerator=cpu (or auto)")


def _check_loss(cfg: DictConfig, report: Report) -> None:
    loss = cfg.loss
    if loss.prediction_type not in (None, *PREDICTION_TYPES):
        report(
            f"loss.prediction_type: {loss.prediction_type!r} is not one of null (from the scheduler), "
            f"{', '.join(PREDICTION_TYPES)}"
        )
    if loss.snr_gamma is not None and not loss.snr_gamma > 0:
        report(f"loss.snr_gamma: must be positive or null, got {loss.snr_gamma}")


def _check_sampling(cfg: DictConfig, report: Report) -> None:
    from sdtune.sampling import SCHEDULERS

    sampling = cfg.sampling
    if sampling.scheduler not in SCHEDULERS:
        report(
            f"sampling.scheduler: unknown scheduler {sampling.scheduler!r}; valid: {', '.join(SCHEDULERS)}"
        )
    if sampling.steps < 1:
        report(f"sampling.steps: must be >= 1, got {sampling.steps}")
    if sampling.every_n_steps < 0:
        report(f"sampling.every_n_steps: must be >= 0 (0 = only at the end), got {sampling.every_n_steps}")


def _check_runtime(cfg: DictConfig, report: Report) -> None:
    from sdtune.perf import check_runtime

    check_runtime(cfg, report)


def _check_export(cfg: DictConfig, report: Report) -> None:
    from sdtune.formats.exporters import EXPORTERS, LORA_FORMATS

    formats = list(cfg.export.formats)
    unknown = [f for f in formats if f not in EXPORTERS]
    if unknown:
        report(f"export.formats: unknown format(s) {unknown}; valid: {', '.join(EXPORTERS)}")
    lora_only = [f for f in formats if f in LORA_FORMATS]
    if cfg.method.name != "lora" and lora_only:
        report(
            f"export.formats: {lora_only} export a LoRA, but method={cfg.method.name} trains no adapter; "
            "use merged or single_file"
        )
    if cfg.model.family == "sdxl" and ("kohya" in formats or "single_file" in formats):
        report("export.formats: kohya and single_file exports for SDXL are not supported yet")
