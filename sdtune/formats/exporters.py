"""Export the trained weights of a module into each requested format; used at the end of training."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from sdtune.formats.diffusers import save_diffusers_lora
from sdtune.io import atomic_path


def _diffusers(module: Any, run_dir: Path) -> Path:
    return save_diffusers_lora(run_dir / "lora", module.unet, module.stack.text_encoder)


def _pipeline(module: Any, run_dir: Path) -> Path:
    """A full fine-tune as a diffusers pipeline folder, for `StableDiffusionPipeline.from_pretrained`.

    Its scheduler is DPM-Solver++ (2M), configured from the base model's scheduler config.
    """
    from diffusers import StableDiffusionPipeline

    from sdtune.models.adapters import adapter_config
    from sdtune.sampling import make_scheduler

    stack = module.stack
    if adapter_config(stack.unet) is not None or adapter_config(stack.text_encoder) is not None:
        raise ValueError(
            "export.formats: pipeline needs a full fine-tune (method=full); a LoRA exports as diffusers"
        )
    pipe = StableDiffusionPipeline(
        vae=stack.vae,
        text_encoder=stack.text_encoder,
        tokenizer=stack.tokenizer,
        unet=stack.unet,
        scheduler=make_scheduler("dpmpp_2m", stack.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out = run_dir / "pipeline"
    with atomic_path(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return out


EXPORTERS: dict[str, Callable[[Any, Path], Path]] = {"diffusers": _diffusers, "pipeline": _pipeline}


def export_formats(module: Any, run_dir: Path, formats: list[str]) -> list[dict[str, str]]:
    """Write each format under `run_dir`; returns manifest entries (format, path relative to the run)."""
    unknown = [f for f in formats if f not in EXPORTERS]
    if unknown:
        raise ValueError(f"export.formats: unknown format(s) {unknown}; valid: {', '.join(EXPORTERS)}")
    return [
        {"format": name, "path": str(EXPORTERS[name](module, run_dir).relative_to(run_dir))}
        for name in formats
    ]
