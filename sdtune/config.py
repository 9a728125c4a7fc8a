"""Config validation that collects every problem and reports them at once, before any expensive work."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from sdtune.config_types import Report, check_types, is_count, is_index, require_number
from sdtune.optimizers import optimizer_problems

PREDICTION_TYPES = ("epsilon", "v_prediction")
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
    from sdtune.distributed import register_resolvers as register_distributed_resolvers

    if not OmegaConf.has_resolver("sdtune_precision"):
        OmegaConf.register_new_resolver("sdtune_precision", default_precision)
    register_distributed_resolvers()


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
    from sdtune.distributed import check_distributed

    require_given(cfg)  # the other checks would trip over missing keys

    checks = (
        _check_model,
        _check_method,
        _check_data,
        _check_trainer,
        _check_loss,
        _check_sampling,
        _check_evaluation,
        _check_export,
        _check_conditioning,
        check_distributed,
        _check_runtime,
        _check_logger,
        check_types,
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


def _check_logger(cfg: DictConfig, report: Report) -> None:
    import importlib.util

    target = str((cfg.get("logger") or {}).get("_target_", ""))
    if target.endswith("TensorBoardLogger") and not any(
        importlib.util.find_spec(name) for name in ("tensorboard", "tensorboardX")
    ):
        report(
            "logger=tensorboard: the tensorboard package is not installed; pip install 'sdtune[tensorboard]' "
            "(or tensorboard), or choose logger=wandb | csv | none"
        )


def require_given(cfg: DictConfig) -> None:
    """A ConfigError naming each key left at `???` (sdtune.train/sample/export give some none by default)."""
    missing = missing_keys(cfg)
    if missing:
        raise ConfigError([f"{key}: required; set it on the command line ({key}=...)" for key in missing])


def missing_keys(node: DictConfig, prefix: str = "") -> list[str]:
    """Dotted keys left at `???` (interpolations that point at them are not followed; hydra's own skipped)."""
    found = []
    for key in node:
        name = f"{prefix}{key}"
        if name == "hydra" or OmegaConf.is_interpolation(node, key):
            continue
        if OmegaConf.is_missing(node, key):
            found.append(name)
        elif isinstance(node[key], DictConfig):
            found += missing_keys(node[key], f"{name}.")
    return found


def _check_model(cfg: DictConfig, report: Report) -> None:
    from sdtune.models.loading import FAMILIES, classify_source

    model = cfg.model
    if model.get("weights") not in (None, "pretrained", "random"):
        report(f"model.weights: {model.weights!r} is not one of pretrained, random")
    elif model.get("weights") == "pretrained" and model.get("pretrained") is None and model.family != "sdxl":
        from sdtune.models import tiny

        try:
            tiny.pretrained_files()
        except FileNotFoundError as error:
            report(f"model.weights: {error}")
    if model.family not in FAMILIES:
        report(f"model.family: {model.family!r} is not one of {', '.join(FAMILIES)}")
    elif model.family == "sdxl":
        _check_sdxl(cfg, report)
    if classify_source(model.pretrained) == "missing":
        report(
            f"model.pretrained: {model.pretrained!r} does not exist; give a hub id (org/name), a local "
            "diffusers folder, or a single-file .safetensors/.ckpt checkpoint"
        )
    if classify_source(model.pretrained) == "single_file":
        _check_pickle(Path(model.pretrained).expanduser(), model.allow_pickle, report)
    config = model.get("config")
    if config and config.startswith((".", "/", "~")) and not Path(config).expanduser().is_dir():
        report(
            f"model.config: folder {config!r} does not exist; give a local diffusers folder of the same "
            "architecture"
        )


def _check_sdxl(cfg: DictConfig, report: Report) -> None:
    """What SDXL (two text encoders, micro-conditioning) does not support yet, each with what works."""
    if cfg.method.name == "textual_inversion":
        report("method: textual inversion for SDXL is not supported yet; use method=lora or method=full")
    if cfg.get("runtime") is not None and cfg.runtime.get("quantize") is not None:
        report("runtime.quantize: a quantised SDXL base is not supported yet; set runtime.quantize=null")
    if cfg.data.name not in ("shapes", "captions", "dreambooth"):
        report(
            f"data={cfg.data.name}: SDXL trains on data=captions, shapes or dreambooth only so far (other "
            "datasets do not record the crop for SDXL's micro-conditioning)"
        )
    for name, component in (cfg.get("conditioning") or {}).items():
        if component.get("_target_") != "sdtune.conditioning.text.TextConditioner":
            report(f"conditioning.{name}: SDXL supports text conditioning only so far")
        elif component.get("clip_skip", 1) != 1:
            report(
                f"conditioning.{name}.clip_skip: SDXL always reads its encoders' penultimate layers (as its "
                "pipeline and sd-scripts do); leave it at 1"
            )
        elif component.get("max_token_length", 75) != 75:
            report(f"conditioning.{name}.max_token_length: SDXL reads 75 tokens so far; leave it at 75")


def _check_pickle(path: Path, allow_pickle: bool, report: Report) -> None:
    """A pickle-based single file must load weights-only, unless the user opted in to full unpickling."""
    from sdtune.checkpoint import PICKLE_SUFFIXES, UntrustedFileError, load_pickle_safely

    if path.suffix.lower() not in PICKLE_SUFFIXES or allow_pickle:
        return
    try:
        load_pickle_safely(path, key="model.pretrained", allow_pickle=False, mmap=True)
    except UntrustedFileError as error:
        report(str(error))
    except (RuntimeError, OSError) as error:
        report(f"model.pretrained: cannot read {path} as a PyTorch checkpoint ({error})")


# trainer.precision values Lightning accepts (sdtune's own checks key on these spellings)
PRECISIONS = (
    *("32-true", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true", "32", "bf16", "16", "64"),
    *("transformer-engine", "transformer-engine-float16"),
)


def _check_method(cfg: DictConfig, report: Report) -> None:
    from sdtune.models.adapters import METHODS, VARIANTS

    method = cfg.method
    if method.name not in METHODS:
        report(f"method.name: unknown method {method.name!r}; use one of method={', method='.join(METHODS)}")
    if method.name == "lora":
        for key in ("rank", "alpha"):
            value = method[key]
            if not isinstance(value, (int, float)) or value <= 0:
                report(f"method.{key}: must be a positive number, got {value!r}")
        if not isinstance(method.rank, int):
            report(f"method.rank: must be an integer, got {method.rank!r}")
        if method.get("variant", "lora") not in VARIANTS:
            report(f"method.variant: {method.variant!r} is not one of {', '.join(VARIANTS)}")
        if not method.target_modules:
            report(
                "method.target_modules: must list at least one module name, e.g. [to_q, to_k, to_v, to_out.0]"
            )
        require_number(report, "method.dropout", method.dropout, lambda v: 0 <= v < 1, "a number in [0, 1)")
        _check_loraplus(method, report)
        init_from = method.get("init_from")
        if init_from is not None and not Path(init_from).expanduser().is_file():
            report(f"method.init_from: LoRA file {init_from!r} does not exist")
    elif method.name == "vae" and method.get("parts", "all") not in ("all", "decoder"):
        report(f"method.parts: {method.parts!r} is not one of all, decoder")
    elif method.name == "textual_inversion":
        if method.weight_decay:
            report(
                "method.weight_decay: must be 0 for textual inversion (decay would shrink the frozen rows "
                "of the embedding matrix)"
            )
        require_number(report, "method.num_vectors", method.num_vectors, is_count, "an integer >= 1")
    preserve = method.get("preserve_unconditional", False)
    if not isinstance(preserve, bool):
        report(f"method.preserve_unconditional: must be true or false, got {preserve!r}")
    elif preserve:
        _check_preserve_unconditional(cfg, report)
    for problem in optimizer_problems(method):
        report(problem)
    require_number(report, "method.lr", method.lr, lambda v: v > 0, "a positive number")
    if method.get("text_encoder_lr") is not None:
        require_number(
            report, "method.text_encoder_lr", method.text_encoder_lr, lambda v: v > 0, "a positive number"
        )
    if method.lr_scheduler not in LR_SCHEDULERS:
        report(f"method.lr_scheduler: {method.lr_scheduler!r} is not one of {', '.join(LR_SCHEDULERS)}")
    warmup = method.lr_warmup_steps
    require_number(report, "method.lr_warmup_steps", warmup, is_index, "an integer >= 0")
    require_number(
        report, "method.prior_loss_weight", method.prior_loss_weight, lambda v: v >= 0, "a number >= 0"
    )
    if method.ema is not None:
        _check_ema(method.ema, report)


def _check_preserve_unconditional(cfg: DictConfig, report: Report) -> None:
    key = "method.preserve_unconditional"
    if cfg.method.name != "lora":
        report(
            f"{key}: needs an adapter to switch off for the base's prediction (method=lora), "
            f"not method={cfg.method.name}"
        )
    rates = [part.get("dropout") for part in cfg.conditioning.values()]
    if not any(isinstance(rate, (int, float)) and rate > 0 for rate in rates):
        report(f"{key}: no sample is ever unconditional; set conditioning.<name>.dropout > 0 (e.g. 0.1)")
    if cfg.loss.prediction_type is not None:
        report(
            f"{key}: the base's own predictions become targets, so they must be of the type the run trains; "
            "leave loss.prediction_type null"
        )


def _check_loraplus(method: DictConfig, report: Report) -> None:
    ratio = method.get("loraplus_lr_ratio")
    if ratio is None:
        return
    require_number(report, "method.loraplus_lr_ratio", ratio, lambda v: v > 0, "a positive number or null")
    if method.get("variant", "lora") not in ("lora", "dora"):
        report(
            f"method.loraplus_lr_ratio: LoRA+ speeds up LoRA's B matrices; method.variant={method.variant} "
            "has none (use variant=lora or dora, or loraplus_lr_ratio=null)"
        )


def _check_ema(ema: DictConfig, report: Report) -> None:
    from sdtune.callbacks.ema import DEVICES

    # Keys left out (`method.ema={_target_: ..., decay: 0.999}` on a LoRA) take EMACallback's defaults.
    decay, every = ema.get("decay", 0.9999), ema.get("update_every", 1)
    device, warmup = ema.get("device", "same"), ema.get("warmup", True)
    if not isinstance(decay, int | float) or not 0 <= decay < 1:
        report(f"method.ema.decay: must be in [0, 1), e.g. 0.9999, got {decay!r}")
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        report(f"method.ema.update_every: must be an integer >= 1, got {every!r}")
    if device not in DEVICES:
        report(f"method.ema.device: {device!r} is not one of {', '.join(DEVICES)}")
    if not isinstance(warmup, bool):
        report(f"method.ema.warmup: must be true or false, got {warmup!r}")


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
    separator = data.get("caption_separator", ",")
    if not isinstance(separator, str) or not separator.strip():
        report(f"data.caption_separator: must be a non-blank string such as ',', got {separator!r}")
    if data.name == "dreambooth":
        _check_dreambooth(data, report)
    if data.name == "shapes":
        _check_shape_choices(data, "data", report)
    for name, component in (cfg.get("conditioning") or {}).items():
        if not 0 <= component.get("dropout", 0) <= 1:
            report(f"conditioning.{name}.dropout: must be in [0, 1], got {component.dropout}")


def _check_shape_choices(section: DictConfig, key: str, report: Report) -> None:
    """shapes / colours / backgrounds lists of the shapes world name only what it can draw."""
    from sdtune.data.shapes import BACKGROUNDS, COLOURS, SHAPES

    for field, known in (("shapes", SHAPES), ("colours", COLOURS), ("backgrounds", BACKGROUNDS)):
        chosen = section.get(field)
        if chosen is None:
            continue
        unknown = [name for name in chosen if name not in known]
        if unknown or len(chosen) == 0:
            report(f"{key}.{field}: {list(chosen)} must be a non-empty list from {list(known)} or null (all)")


def _check_evaluation(cfg: DictConfig, report: Report) -> None:
    from sdtune.evaluation import check_prompts, prompts_from_config, unscorable_inputs
    from sdtune.sampling import SCHEDULERS

    evaluation = cfg.get("evaluation")
    if not evaluation or not evaluation.every_n_steps:
        return
    for name, needed in unscorable_inputs(cfg.conditioning):
        report(
            f"evaluation.every_n_steps: the evaluation generates from text prompts, but conditioning.{name} "
            f"needs {needed} files; set evaluation.every_n_steps=0"
        )
    _check_shape_choices(evaluation, "evaluation", report)
    if evaluation.scheduler not in SCHEDULERS:
        valid = ", ".join(SCHEDULERS)
        report(f"evaluation.scheduler: unknown scheduler {evaluation.scheduler!r}; valid: {valid}")
    try:
        for problem in check_prompts(prompts_from_config(evaluation)):
            report(f"evaluation.{problem}")
    except (KeyError, TypeError, ValueError) as error:
        report(f"evaluation.prompts: cannot read the prompt set ({error})")


def _check_dreambooth(data: DictConfig, report: Report) -> None:
    from sdtune.data.class_images import list_images
    from sdtune.data.records import IMAGE_SUFFIXES
    from sdtune.sampling import SCHEDULERS

    if data.instance_dir is not None:
        folder = Path(data.instance_dir).expanduser()
        if not folder.is_dir():
            report(
                f"data.instance_dir: folder {data.instance_dir!r} does not exist; give a folder of images of "
                "your subject"
            )
        elif not list_images(folder):
            report(f"data.instance_dir: no images ({', '.join(IMAGE_SUFFIXES)}) in {data.instance_dir!r}")
    if not isinstance(data.instance_prompt, str) or not data.instance_prompt.strip():
        report('data.instance_prompt: must be a prompt naming the subject, e.g. "a photo of sks dog"')
    if data.class_prompt is None:
        return  # no prior preservation
    if not isinstance(data.class_prompt, str) or not data.class_prompt.strip():
        report('data.class_prompt: must be a prompt, e.g. "a photo of dog", or null (no prior preservation)')
    if not isinstance(data.num_class_images, int) or data.num_class_images < 1:
        report(f"data.num_class_images: must be an integer >= 1, got {data.num_class_images!r}")
    if data.class_dir is not None and Path(data.class_dir).expanduser().is_file():
        report(f"data.class_dir: {data.class_dir!r} is a file; give a folder (created if missing)")
    generation = data.class_generation
    if generation.scheduler not in SCHEDULERS:
        report(
            f"data.class_generation.scheduler: unknown scheduler {generation.scheduler!r}; "
            f"valid: {', '.join(SCHEDULERS)}"
        )
    for key in ("steps", "batch_size"):
        if not isinstance(generation[key], int) or generation[key] < 1:
            report(f"data.class_generation.{key}: must be an integer >= 1, got {generation[key]!r}")


def _check_trainer(cfg: DictConfig, report: Report) -> None:
    trainer = cfg.trainer
    if not isinstance(trainer.max_steps, int) or trainer.max_steps <= 0:
        report(f"trainer.max_steps: must be a positive integer, got {trainer.max_steps!r}")
    require_number(
        report,
        "trainer.accumulate_grad_batches",
        trainer.accumulate_grad_batches,
        is_count,
        "an integer >= 1",
    )
    if str(trainer.precision) not in PRECISIONS:
        report(f"trainer.precision: {trainer.precision!r} is not one of {', '.join(PRECISIONS)}")
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
    if loss.snr_gamma is not None:
        require_number(report, "loss.snr_gamma", loss.snr_gamma, lambda v: v > 0, "a positive number or null")
    _check_timestep_bias(loss.get("timestep_bias"), report)
    _check_loss_type(loss, report)
    limit = loss.max_nonfinite_steps
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        report(f"loss.max_nonfinite_steps: must be an integer >= 1, got {limit!r}")


def _check_loss_type(loss: DictConfig, report: Report) -> None:
    from sdtune.losses import HUBER_SCHEDULES, LOSS_TYPES

    kind = loss.get("type", "mse")
    if kind not in LOSS_TYPES:
        report(f"loss.type: {kind!r} is not one of {', '.join(LOSS_TYPES)}")
    if kind in ("huber", "smooth_l1"):
        require_number(report, "loss.huber_c", loss.huber_c, lambda v: 0 < v < 1, "a number in (0, 1)")
        if loss.huber_schedule not in HUBER_SCHEDULES:
            report(f"loss.huber_schedule: {loss.huber_schedule!r} is not one of {', '.join(HUBER_SCHEDULES)}")


def _check_timestep_bias(bias: DictConfig | None, report: Report) -> None:
    from sdtune.losses import TIMESTEP_BIAS

    if not bias:
        return
    if bias.strategy not in TIMESTEP_BIAS:
        report(f"loss.timestep_bias.strategy: {bias.strategy!r} is not one of {', '.join(TIMESTEP_BIAS)}")
    if not isinstance(bias.multiplier, int | float) or not bias.multiplier > 0:
        report(f"loss.timestep_bias.multiplier: must be a positive number, got {bias.multiplier!r}")
    if not isinstance(bias.portion, int | float) or not 0 < bias.portion <= 1:
        report(f"loss.timestep_bias.portion: must be in (0, 1], got {bias.portion!r}")
    span = bias.get("range")
    if bias.strategy == "range":
        valid = span is not None and len(span) == 2 and all(isinstance(t, int) for t in span)
        if not valid or not 0 <= span[0] < span[1]:
            report(
                f"loss.timestep_bias.range: strategy=range needs [begin, end), 0 <= begin < end; got {span}"
            )


def _check_sampling(cfg: DictConfig, report: Report) -> None:
    from sdtune.sampling import SCHEDULERS

    sampling = cfg.sampling
    if sampling.scheduler not in SCHEDULERS:
        report(
            f"sampling.scheduler: unknown scheduler {sampling.scheduler!r}; valid: {', '.join(SCHEDULERS)}"
        )
    require_number(report, "sampling.steps", sampling.steps, is_count, "an integer >= 1")
    for i, prompt in enumerate(sampling.prompts or []):
        if not isinstance(prompt, str):
            report(f"sampling.prompts[{i}]: must be a prompt, got {prompt!r}; set sampling.prompts=[...]")
    every, what = sampling.every_n_steps, "an integer >= 0 (0 = only at the end)"
    require_number(report, "sampling.every_n_steps", every, is_index, what)


def _check_conditioning(cfg: DictConfig, report: Report) -> None:
    from sdtune.conditioning.checks import check_conditioning

    check_conditioning(cfg, report)


def _check_runtime(cfg: DictConfig, report: Report) -> None:
    from sdtune.perf import check_runtime

    check_runtime(cfg, report)


def _check_export(cfg: DictConfig, report: Report) -> None:
    from sdtune.formats.exporters import EXPORTERS, LORA_FORMATS

    check_export_dtype("export.dtype", cfg.export.get("dtype"), report)
    formats = list(cfg.export.formats)
    unknown = [f for f in formats if f not in EXPORTERS]
    if unknown:
        report(f"export.formats: unknown format(s) {unknown}; valid: {', '.join(EXPORTERS)}")
    if method_embeds := [f for f in formats if f in ("embedding", "a1111_embedding")]:
        if cfg.method.name != "textual_inversion":
            report(f"export.formats: {method_embeds} need method=textual_inversion")
    lora_only = [f for f in formats if f in LORA_FORMATS]
    if cfg.method.name != "lora" and lora_only:
        report(
            f"export.formats: {lora_only} export a LoRA, but method={cfg.method.name} trains no adapter; "
            "use merged or single_file"
        )
    if cfg.model.family == "sdxl" and cfg.method.get("variant", "lora") != "lora" and "kohya" in formats:
        report("export.formats: kohya export of SDXL supports plain LoRA only (method.variant=lora)")


def check_export_dtype(key: str, value: Any, report: Report) -> None:
    """An export's weight type is null (as trained) or one torch dtype name."""
    from sdtune.perf import DTYPES

    if value is not None and value not in DTYPES:
        report(f"{key}: unknown dtype {value!r}; use null (as trained) or one of {', '.join(DTYPES)}")
