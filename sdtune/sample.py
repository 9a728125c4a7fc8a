"""`python -m sdtune.sample source=<run dir | base model> prompt="…" out=…`: the training-time sampler.

Runs with extra conditions take them as files: `map=…` (semantic map), `image=…` (source image to edit),
`representation=…` (vector), `image_prompt=…` (an image embedded for cross-attention).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

from sdtune.conditioning.text import MAX_TOKEN_LENGTHS
from sdtune.config import ConfigError, require_given
from sdtune.config_types import is_count, is_fraction, is_index, require_flag, require_number
from sdtune.io import atomic_path
from sdtune.run import MANIFEST, unreadable_run
from sdtune.sampling import SCHEDULERS

CONDITION_INPUTS = (
    "map",
    "image",
    "representation",
    "image_prompt",
)  # sample.yaml keys naming condition files


# What a run's source can be sampled from: its LoRA (diffusers or kohya file), full pipeline or embedding.
LOADABLE_EXPORTS = {"diffusers", "kohya", "pipeline", "merged", "embedding"}


TEXT_OPTIONS = ("clip_skip", "max_token_length")  # sample.yaml keys that override the source's text reading


def source_configs(cfg: DictConfig) -> tuple[DictConfig, DictConfig, str | None, str | None, int | None]:
    """(model config, conditioning config, LoRA file, embedding file, resolution) for `cfg.source`; the
    resolution of a base model (None) is its own, known once it is loaded (`native_resolution`).

    A `clip_skip` or `max_token_length` in `cfg` replaces the source's own (a run samples with the ones it
    trained with)."""
    model, conditioning, lora, embedding, resolution = _source_configs(cfg)
    for key in TEXT_OPTIONS:
        if cfg.get(key) is not None and "text" in conditioning:
            conditioning = OmegaConf.merge(conditioning, {"text": {key: cfg[key]}})
    return model, conditioning, lora, embedding, resolution


def run_config(cfg: DictConfig) -> DictConfig | None:
    """The training config of a run source (None for a base model)."""
    source = Path(str(cfg.source)).expanduser()
    if not (source / MANIFEST).is_file():
        return None
    return OmegaConf.load(source / ".hydra" / "config.yaml")


def _source_configs(cfg: DictConfig) -> tuple[DictConfig, DictConfig, str | None, str | None, int | None]:
    source = Path(str(cfg.source)).expanduser()
    if (source / MANIFEST).is_file():
        run_cfg = OmegaConf.load(source / ".hydra" / "config.yaml")
        exports = {e.format: source / e.path for e in OmegaConf.load(source / MANIFEST).exports}
        lora_file = exports.get("diffusers", exports.get("kohya"))  # diffusers' loader reads both
        lora = str(lora_file) if lora_file is not None else None
        embedding = str(exports["embedding"]) if "embedding" in exports else None
        model = run_cfg.model
        pipeline = exports.get("pipeline", exports.get("merged"))
        if lora is None and pipeline is not None:  # a full fine-tune or a widened U-Net: its own pipeline
            model = OmegaConf.merge(model, {"pretrained": str(pipeline.resolve()), "config": None})
        return model, run_cfg.conditioning, lora, embedding, run_cfg.data.resolution
    pretrained = None if cfg.source in ("tiny", "tiny_xl") else str(cfg.source)
    model = OmegaConf.create(
        {
            "family": source_family(cfg),
            "pretrained": pretrained,
            "config": cfg.model_config,
            "revision": None,
            "variant": None,
        }
    )
    text = OmegaConf.create(
        {"text": {"_target_": "sdtune.conditioning.text.TextConditioner", "dropout": 0.0}}
    )
    return model, text, cfg.lora, cfg.embedding, None


def source_problems(cfg: DictConfig) -> list[str]:
    """What is wrong with `cfg.source` as a local path, before anything is loaded (hub ids pass)."""
    if cfg.source in ("tiny", "tiny_xl") or not str(cfg.source).startswith((".", "/", "~")):
        return []
    source = Path(str(cfg.source)).expanduser()
    if not source.exists():
        return [f"source: {cfg.source!r} does not exist; give a run directory, tiny, or a base model"]
    if source.is_dir() and not (source / MANIFEST).is_file() and not (source / "model_index.json").is_file():
        return [
            f"source: {cfg.source!r} is neither a finished sdtune run (no {MANIFEST}: a run that stopped "
            "early has only checkpoints/; resume it to finish) nor a diffusers folder (no model_index.json)"
        ]
    if (source / MANIFEST).is_file():
        try:
            formats = [e.format for e in OmegaConf.load(source / MANIFEST).exports]
        except (OSError, yaml.YAMLError, AttributeError, TypeError) as error:
            return [unreadable_run(cfg.source, MANIFEST, error)]
        if not set(formats) & LOADABLE_EXPORTS:
            return [
                f"source: the run {cfg.source!r} exported {formats or 'nothing'}, none of which sampling "
                f"reads ({', '.join(sorted(LOADABLE_EXPORTS))}); without one it would sample the bare base. "
                f"Export one first: python -m sdtune.export source={cfg.source} format=diffusers out=<folder>"
            ]
        try:
            OmegaConf.load(source / ".hydra" / "config.yaml")
        except (OSError, yaml.YAMLError) as error:
            return [unreadable_run(cfg.source, ".hydra/config.yaml", error)]
    return []


def source_family(cfg: DictConfig) -> str:
    """The family of a base-model source: `cfg.family` if set, `sdxl` for tiny_xl or a folder holding an
    SDXL pipeline (its `model_index.json`), else sd1 (SD2 models sample the same way)."""
    if cfg.get("family"):
        return str(cfg.family)
    if cfg.source == "tiny_xl":
        return "sdxl"
    index = Path(str(cfg.source)).expanduser() / "model_index.json"
    if not index.is_file():
        return "sd1"
    try:
        class_name = json.loads(index.read_text(encoding="utf-8")).get("_class_name", "")
    except (ValueError, AttributeError) as error:
        problem = f"source: {index} is not a diffusers model_index.json ({error}); re-save the pipeline"
        raise ConfigError([f"{problem} or give family=sd1|sdxl"]) from error
    return "sdxl" if "XL" in str(class_name) else "sd1"


def request_problems(cfg: DictConfig) -> list[str]:
    """What `sdtune.sample` and `sdtune.evaluate` both check besides the source: scheduler, files, numbers."""
    problems = []
    if cfg.scheduler not in SCHEDULERS:
        problems.append(f"scheduler: unknown scheduler {cfg.scheduler!r}; valid: {', '.join(SCHEDULERS)}")
    for key in ("lora", "embedding"):
        if cfg[key] is not None and not Path(cfg[key]).expanduser().is_file():
            problems.append(f"{key}: file {cfg[key]!r} does not exist")
    report = problems.append
    for key in ("steps", "num_images", "per_prompt", "batch_size"):
        if key in cfg:
            require_number(report, key, cfg[key], is_count, "an integer >= 1")
    require_number(report, "seed", cfg.seed, lambda v: isinstance(v, int), "an integer")
    require_number(report, "guidance", cfg.guidance, lambda v: v >= 0, "a number >= 0 (1 = no guidance)")
    require_number(
        report, "guidance_rescale", cfg.guidance_rescale, is_fraction, "a number in [0, 1], e.g. 0.7"
    )
    if cfg.resolution is not None:
        require_number(report, "resolution", cfg.resolution, _pixels, "null or a positive multiple of 8")
    if "judge_renders" in cfg:
        require_number(report, "judge_renders", cfg.judge_renders, is_index, "an integer >= 0")
    if cfg.get("clip_skip") is not None:
        require_number(report, "clip_skip", cfg.clip_skip, is_count, "null or an integer >= 1")
    if cfg.get("max_token_length") not in (None, *MAX_TOKEN_LENGTHS):
        problems.append(f"max_token_length: got {cfg.max_token_length!r}; use null, 75, 150 or 225")
    require_flag(report, "overwrite", cfg.overwrite)
    return problems


def _pixels(value: Any) -> bool:
    return isinstance(value, int) and value > 0 and value % 8 == 0


def guidance_problems(cfg: DictConfig, cond_cfg: DictConfig) -> list[str]:
    """`condition_guidance` names that are not conditions of the source (its conditioning config)."""
    unknown = [name for name in cfg.get("condition_guidance") or {} if name not in cond_cfg]
    if not unknown:
        return []
    return [f"condition_guidance: unknown condition(s) {unknown}; this model has {list(cond_cfg)}"]


def check(cfg: DictConfig) -> None:
    require_given(cfg)
    source_bad = source_problems(cfg)  # the source's conditions are checked only if it loads
    problems = request_problems(cfg) + source_bad
    if not source_bad:
        cond_cfg = source_configs(cfg)[1]
        problems += input_problems(cfg, cond_cfg) + guidance_problems(cfg, cond_cfg)
    targets = output_paths(Path(cfg.out), len(prompts_of(cfg)) * cfg.num_images)
    existing = [str(p) for p in targets if p.exists()]
    if existing and not cfg.overwrite:
        problems.append(f"out: {', '.join(existing)} already exist(s); pass overwrite=true or another out")
    if problems:
        raise ConfigError(problems)


def prompts_of(cfg: DictConfig) -> list[str]:
    return list(cfg.prompt) if isinstance(cfg.prompt, ListConfig) else [str(cfg.prompt)]


def output_paths(out: Path, count: int) -> list[Path]:
    """A single .png when one image is asked for and `out` names a file; else numbered files in a folder."""
    if out.suffix.lower() == ".png":
        if count == 1:
            return [out]
        return [out.with_name(f"{out.stem}_{i:03d}.png") for i in range(count)]
    return [out / f"{i:03d}.png" for i in range(count)]


def input_problems(cfg: DictConfig, cond_cfg: DictConfig) -> list[str]:
    """Condition files (map=, image=, representation=, image_prompt=) the source needs but lacks, or takes
    no use for."""
    from hydra.utils import get_class

    problems = []
    needed = {getattr(get_class(c._target_), "input", None) for c in cond_cfg.values()}
    for key in CONDITION_INPUTS:
        path = cfg[key]
        if key in needed and path is None:
            article = "an" if key[0] in "aeiou" else "a"
            problems.append(f"{key}: this model is conditioned on {article} {key}; pass {key}=<file>")
        elif path is not None and key not in needed:
            problems.append(f"{key}: this model takes no {key} condition; leave {key} out")
        elif path is not None and not Path(path).expanduser().is_file():
            problems.append(f"{key}: file {path!r} does not exist")
    return problems


def condition_inputs(cfg: DictConfig, conditioning: Any, resolution: int) -> dict[str, Any]:
    """Batch entries (batch size 1) read from the condition files, e.g. {"map": (1, H, W) class ids}."""
    inputs = {}
    for component in conditioning.components.values():
        key = getattr(component, "input", None)
        if key is None:
            continue
        try:
            inputs[component.key] = component.read_input(str(Path(cfg[key]).expanduser()), resolution)
        except (OSError, ValueError) as error:
            raise ConfigError([f"{key}: {cfg[key]}: {error}"]) from error
    return inputs


def load_conditioning_weights(cfg: DictConfig, conditioning: Any) -> None:
    """Trained conditioning weights (e.g. a representation projection) of a run source, if it has them."""
    from safetensors.torch import load_file

    manifest = Path(str(cfg.source)).expanduser() / MANIFEST
    if not manifest.is_file():
        return
    entry = next((e for e in OmegaConf.load(manifest).exports if e.format == "conditioning"), None)
    if entry is not None:
        path = manifest.parent / entry.path
        unexpected = conditioning.load_state_dict(load_file(str(path)), strict=False).unexpected_keys
        if unexpected:
            raise ConfigError([f"source: {path} holds {unexpected[0]!r}, which the run's conditioning lacks"])


def load_lora(stack: Any, path: str) -> None:
    """Apply a LoRA file to the stack's U-Net and text encoder(s) with diffusers' own loader."""
    from sdtune.models.loading import stack_pipeline

    stack_pipeline(stack).load_lora_weights(path)


def load_source(cfg: DictConfig) -> tuple[Any, Any, int]:
    """(stack, conditioning, native resolution) of `cfg.source`, with its LoRA / embedding / conditioning."""
    from sdtune.conditioning import build_conditioning
    from sdtune.models import load_stack
    from sdtune.models.adapters import apply_noise_schedule
    from sdtune.models.textual_inversion import load_embedding

    model_cfg, cond_cfg, lora, embedding, native = source_configs(cfg)
    stack = load_stack(model_cfg, Path(cfg.cache_dir))
    run_cfg = run_config(cfg)
    if run_cfg is not None:  # sample with the schedule it trained with (zero terminal SNR, v-prediction)
        apply_noise_schedule(stack, run_cfg.method, run_cfg.loss)
    if lora:
        load_lora(stack, lora)
    if embedding:
        load_embedding(stack, embedding, cfg.token)
    conditioning = build_conditioning(cond_cfg, stack)
    load_conditioning_weights(cfg, conditioning)
    return stack, conditioning, native or native_resolution(stack)


def native_resolution(stack: Any) -> int:
    """What the model was trained at, as diffusers' pipelines default it: U-Net sample size × VAE scale
    (SD1.5 64 × 8 = 512, SDXL 1024, the tiny stack 64)."""
    from sdtune.models.loading import vae_scale_factor

    return int(stack.unet.config.sample_size) * vae_scale_factor(stack.vae)


def sample(cfg: DictConfig) -> list[Path]:
    """Generate the images `cfg` asks for and write them; returns their paths."""
    from sdtune.sampling import generate, make_scheduler, to_pil

    check(cfg)
    stack, conditioning, native = load_source(cfg)
    prompts = [p for p in prompts_of(cfg) for _ in range(cfg.num_images)]
    seeds = [cfg.seed + i for _ in prompts_of(cfg) for i in range(cfg.num_images)]
    resolution = cfg.resolution or native
    inputs = condition_inputs(cfg, conditioning, resolution)
    images = []
    for prompt, seed in zip(prompts, seeds):
        batch = {"caption": [prompt], "negative_caption": [cfg.negative_prompt], **inputs}
        scheduler = make_scheduler(cfg.scheduler, stack.scheduler_config, seed=seed)
        tensor = generate(
            stack.unet,
            stack.vae,
            conditioning,
            batch,
            scheduler=scheduler,
            steps=cfg.steps,
            guidance=cfg.guidance,
            seed=seed,
            height=resolution,
            width=resolution,
            condition_guidance=cfg.condition_guidance,
            guidance_rescale=cfg.guidance_rescale,
        )
        images += to_pil(tensor)
    paths = output_paths(Path(cfg.out), len(images))
    for image, path in zip(images, paths):
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG")
    return paths


@hydra.main(version_base="1.3", config_path="../conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    torch.set_grad_enabled(False)
    try:
        paths = sample(cfg)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    for path in paths:
        print(path)


if __name__ == "__main__":
    main()
