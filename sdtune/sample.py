"""`python -m sdtune.sample source=<run dir | base model> prompt="…" out=…`: the training-time sampler."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from sdtune.config import ConfigError
from sdtune.io import atomic_path
from sdtune.run import MANIFEST
from sdtune.sampling import SCHEDULERS


def source_configs(cfg: DictConfig) -> tuple[DictConfig, DictConfig, str | None, int]:
    """(model config, conditioning config, LoRA file, resolution) for `cfg.source`."""
    source = Path(str(cfg.source)).expanduser()
    if (source / MANIFEST).is_file():
        run_cfg = OmegaConf.load(source / ".hydra" / "config.yaml")
        manifest = OmegaConf.load(source / MANIFEST)
        lora = next((str(source / e.path) for e in manifest.exports if e.format == "diffusers"), None)
        pipeline = next((source / e.path for e in manifest.exports if e.format == "pipeline"), None)
        if pipeline is not None:  # a full fine-tune: its own pipeline replaces the base model
            run_cfg.model.pretrained, run_cfg.model.config = str(pipeline.resolve()), None
        return run_cfg.model, run_cfg.conditioning, lora, run_cfg.data.resolution
    pretrained = None if cfg.source == "tiny" else str(cfg.source)
    model = OmegaConf.create(
        {
            "family": "sd1",
            "pretrained": pretrained,
            "config": cfg.model_config,
            "revision": None,
            "variant": None,
        }
    )
    text = OmegaConf.create(
        {"text": {"_target_": "sdtune.conditioning.text.TextConditioner", "dropout": 0.0}}
    )
    return model, text, cfg.lora, 64 if pretrained is None else 512


def check(cfg: DictConfig) -> None:
    problems = []
    if cfg.scheduler not in SCHEDULERS:
        problems.append(f"scheduler: unknown scheduler {cfg.scheduler!r}; valid: {', '.join(SCHEDULERS)}")
    if cfg.lora is not None and not Path(cfg.lora).expanduser().is_file():
        problems.append(f"lora: file {cfg.lora!r} does not exist")
    if cfg.steps < 1:
        problems.append(f"steps: must be >= 1, got {cfg.steps}")
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


def load_lora(stack: Any, path: str) -> None:
    """Apply a LoRA file to the stack's U-Net and text encoder with diffusers' own loader."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=stack.vae,
        text_encoder=stack.text_encoder,
        tokenizer=stack.tokenizer,
        unet=stack.unet,
        scheduler=stack.noise_scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.load_lora_weights(path)


def sample(cfg: DictConfig) -> list[Path]:
    """Generate the images `cfg` asks for and write them; returns their paths."""
    from sdtune.conditioning import build_conditioning
    from sdtune.models import load_stack
    from sdtune.sampling import generate, make_scheduler, to_pil

    check(cfg)
    model_cfg, cond_cfg, lora, native = source_configs(cfg)
    stack = load_stack(model_cfg, Path(cfg.cache_dir))
    if lora:
        load_lora(stack, lora)
    conditioning = build_conditioning(cond_cfg, stack)
    prompts = [p for p in prompts_of(cfg) for _ in range(cfg.num_images)]
    seeds = [cfg.seed + i for _ in prompts_of(cfg) for i in range(cfg.num_images)]
    resolution = cfg.resolution or native
    images = []
    for prompt, seed in zip(prompts, seeds):
        batch = {"caption": [prompt], "negative_caption": [cfg.negative_prompt]}
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
