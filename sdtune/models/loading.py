"""Load the frozen latent-diffusion stack from wherever `model.pretrained` points.

`model.pretrained` may be null (the embedded tiny stack), a hub id, a local diffusers folder, or a single-file
checkpoint in the original SD layout (`.safetensors` / `.ckpt`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from sdtune.config import ConfigError

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
FAMILIES = ("sd1", "sd2", "sdxl")


def vae_scale_factor(vae: Any) -> int:
    """Pixels per latent pixel: 2^(VAE levels − 1) (8 for every Stable Diffusion VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


@dataclass
class Stack:
    """The components of a Stable Diffusion model, plus where they came from."""

    vae: Any
    unet: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any
    family: str
    base_model: str
    # Textual inversion: placeholder -> its tokens; caption rewrites (word -> text) the text encoder applies.
    placeholders: dict[str, list[str]] = field(default_factory=dict)
    caption_rewrites: dict[str, str] = field(default_factory=dict)
    # SDXL: the second text encoder (with projection: its pooled output conditions the U-Net) and tokenizer.
    text_encoder_2: Any = None
    tokenizer_2: Any = None

    @property
    def scheduler_config(self) -> dict[str, Any]:
        return dict(self.noise_scheduler.config)

    @property
    def text_encoders(self) -> list[Any]:
        """The text encoders the stack has (one, or SDXL's two)."""
        return [e for e in (self.text_encoder, self.text_encoder_2) if e is not None]


def classify_source(pretrained: str | None) -> str:
    """One of `tiny`, `single_file`, `local`, `hub`, or `missing` (a path that does not exist)."""
    if pretrained is None:
        return "tiny"
    path = Path(os.path.expanduser(pretrained))
    if path.is_file():
        return "single_file"
    if path.is_dir():
        return "local"
    looks_like_path = pretrained.startswith((".", "/", "~")) or pretrained.endswith(SINGLE_FILE_SUFFIXES)
    if looks_like_path or pretrained.count("/") != 1:
        return "missing"
    return "hub"


def load_stack(model: DictConfig, cache_dir: Path) -> Stack:
    """Load the stack described by the `model` config group (all components frozen, in eval mode)."""
    from diffusers import DDPMScheduler

    kind = classify_source(model.pretrained)
    if kind == "tiny":
        pipe, base = _from_pretrained(str(_ensure_tiny(model, cache_dir)), model, local=True)
    elif kind == "local":
        pipe, base = _from_pretrained(str(Path(model.pretrained).expanduser().resolve()), model, local=True)
    elif kind == "hub":
        pipe, base = _from_pretrained(model.pretrained, model, local=False)
    elif kind == "single_file":
        pipe, base = _from_single_file(model, cache_dir), str(Path(model.pretrained).expanduser().resolve())
    else:
        raise ConfigError([f"model.pretrained: {model.pretrained!r} does not exist"])
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    text_encoder_2 = getattr(pipe, "text_encoder_2", None)
    for part in (pipe.vae, pipe.unet, pipe.text_encoder, text_encoder_2):
        if part is not None:
            part.requires_grad_(False)
            part.eval()
    return Stack(
        pipe.vae,
        pipe.unet,
        pipe.text_encoder,
        pipe.tokenizer,
        noise_scheduler,
        model.family,
        base,
        text_encoder_2=text_encoder_2,
        tokenizer_2=getattr(pipe, "tokenizer_2", None),
    )


def _ensure_tiny(model: DictConfig, cache_dir: Path) -> Path:
    """The embedded tiny stack of `model.family` (SDXL's for sdxl, else SD1.5's) as a diffusers folder."""
    # Unset, SD1.5's tiny stack is the shipped pretrained one (as in conf/model/tiny.yaml); SDXL's has none.
    weights = model.get("weights") or ("random" if model.family == "sdxl" else "pretrained")
    if model.family == "sdxl":
        if weights != "random":
            raise ConfigError(
                ["model.weights: no pretrained tiny SDXL stack is shipped; use model.weights=random"]
            )
        from sdtune.models.tiny_xl import ensure_tiny_xl_pipeline

        return ensure_tiny_xl_pipeline(cache_dir)
    from sdtune.models.tiny import ensure_tiny_pipeline

    return ensure_tiny_pipeline(cache_dir, weights)


def pipeline_class(family: str) -> Any:
    """The diffusers pipeline class of `family`: `StableDiffusionXLPipeline` for sdxl."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline


def assemble_pipeline(
    *,
    vae: Any,
    unet: Any,
    text_encoder: Any,
    tokenizer: Any,
    scheduler: Any,
    text_encoder_2: Any = None,
    tokenizer_2: Any = None,
) -> Any:
    """A diffusers pipeline around these components: SDXL's when there is a second text encoder."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    common = {
        "vae": vae,
        "unet": unet,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
    }
    if text_encoder_2 is not None:
        return StableDiffusionXLPipeline(**common, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
    return StableDiffusionPipeline(
        **common, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


def stack_pipeline(stack: Stack) -> Any:
    """The loaded stack as a diffusers pipeline (sharing its modules), for diffusers' own loaders."""
    return assemble_pipeline(
        vae=stack.vae,
        unet=stack.unet,
        text_encoder=stack.text_encoder,
        tokenizer=stack.tokenizer,
        scheduler=stack.noise_scheduler,
        text_encoder_2=stack.text_encoder_2,
        tokenizer_2=stack.tokenizer_2,
    )


def _pipeline_kwargs(model: DictConfig) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if model.family != "sdxl":  # SDXL pipelines have no safety checker
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    if model.get("revision"):
        kwargs["revision"] = model.revision
    if model.get("variant"):
        kwargs["variant"] = model.variant
    return kwargs


def _from_pretrained(source: str, model: DictConfig, local: bool) -> tuple[Any, str]:
    pipeline = pipeline_class(model.family)
    kwargs = _pipeline_kwargs(model)
    if local:
        return pipeline.from_pretrained(source, **kwargs), source
    try:
        return pipeline.from_pretrained(source, local_files_only=True, **kwargs), source
    except OSError as cached_error:
        if _offline():
            raise ConfigError(
                [
                    f"model.pretrained: hub id {source!r} is not in the local Hugging Face cache and the hub "
                    "is offline (HF_HUB_OFFLINE). Pass a local diffusers folder or single-file checkpoint "
                    "(model.pretrained=/path/to/model), or download it into the cache on a machine with "
                    "network access (huggingface-cli download)."
                ]
            ) from cached_error
    try:
        return pipeline.from_pretrained(source, **kwargs), source
    except Exception as error:  # the hub client raises many kinds of network and HTTP errors
        raise ConfigError(
            [
                f"model.pretrained: could not download hub id {source!r} ({type(error).__name__}: {error}). "
                "Check the id and your network, or pass a local diffusers folder or single-file checkpoint."
            ]
        ) from error


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _from_single_file(model: DictConfig, cache_dir: Path) -> Any:
    from sdtune.checkpoint import PICKLE_SUFFIXES, loads_weights_only, tensors_only_copy

    kwargs = _pipeline_kwargs(model)
    if model.get("config"):
        config = model.config
        config_path = Path(os.path.expanduser(config))
        kwargs["config"] = str(config_path.resolve()) if config_path.is_dir() else config
    if _offline() or kwargs.get("config"):
        kwargs["local_files_only"] = True
    source = Path(model.pretrained).expanduser()
    # diffusers loads pickles weights-only; a trusted one that needs more is converted once (opt-in only)
    is_pickle = source.suffix.lower() in PICKLE_SUFFIXES
    if is_pickle and model.get("allow_pickle") and not loads_weights_only(source):
        source = tensors_only_copy(source, cache_dir)
    try:
        return pipeline_class(model.family).from_single_file(str(source), **kwargs)
    except Exception as error:  # the single-file loader surfaces format problems as many error kinds
        raise ConfigError(
            [
                f"model.pretrained: could not load single-file checkpoint {model.pretrained!r} "
                f"({type(error).__name__}: {error}). Offline, give the component configs with "
                "model.config=<local diffusers folder or cached hub id of the same architecture>."
            ]
        ) from error
