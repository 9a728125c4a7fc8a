"""The diffusers LoRA format: what `StableDiffusionPipeline.load_lora_weights` reads, alpha included."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from sdtune.models.adapters import adapter_config

WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def lora_layers(model: Any, dtype: torch.dtype | None = None) -> dict[str, Any] | None:
    """The peft LoRA tensors of `model`, floating ones cast to `dtype` if given; None without an adapter."""
    from peft.utils import get_peft_model_state_dict

    if adapter_config(model) is None:
        return None
    return cast_floats(get_peft_model_state_dict(model), dtype)


def cast_floats(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """`tensors` with every floating-point tensor cast to `dtype` (as they are when `dtype` is None)."""
    if dtype is None:
        return tensors
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}


def adapter_metadata(model: Any) -> dict[str, Any] | None:
    """The LoraConfig as a dict; stored in the file so the loader restores alpha (and rsLoRA)."""
    config = adapter_config(model)
    return config.to_dict() if config is not None else None


def save_diffusers_lora(
    out_dir: Path,
    unet: Any,
    text_encoders: dict[str, Any] | None = None,
    sdxl: bool = False,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write `out_dir/pytorch_lora_weights.safetensors` atomically; returns the file path.

    `text_encoders` maps pipeline names (`text_encoder`, SDXL's `text_encoder_2`) to models; those with an
    adapter are saved. With `sdxl` the file is written by `StableDiffusionXLPipeline`. `dtype`: the tensors'
    type in the file (None = as trained).
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipeline = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    kwargs: dict[str, Any] = {}
    for name, model in {"unet": unet, **(text_encoders or {})}.items():
        layers = lora_layers(model, dtype)
        kwargs[f"{name}_lora_layers"] = layers
        kwargs[f"{name}_lora_adapter_metadata"] = adapter_metadata(model) if layers else None
    # Written in a scratch folder, then renamed: other exports may share `out_dir`.
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".tmp-") as tmp:
        pipeline.save_lora_weights(tmp, weight_name=WEIGHT_NAME, safe_serialization=True, **kwargs)
        os.replace(Path(tmp) / WEIGHT_NAME, out_dir / WEIGHT_NAME)
    return out_dir / WEIGHT_NAME
