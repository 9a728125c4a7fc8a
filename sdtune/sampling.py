"""Scheduler registry and the sampling loop shared by validation samples and `sdtune.sample`."""

from __future__ import annotations

import inspect
import math
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from sdtune.conditioning import ConditioningStack

# name -> (diffusers scheduler class, settings on top of the base model's scheduler config)
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "dpmpp_sde": ("DPMSolverSDEScheduler", {}),
}


def make_scheduler(name: str, base_config: dict[str, Any], seed: int | None = None) -> Any:
    """A sampling scheduler by name, configured from the base model's scheduler config."""
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; valid: {', '.join(SCHEDULERS)}")
    class_name, overrides = SCHEDULERS[name]
    settings = dict(overrides)
    if name == "dpmpp_sde" and seed is not None:
        settings["noise_sampler_seed"] = seed
    return getattr(diffusers, class_name).from_config(base_config, **settings)


@torch.no_grad()
def generate(
    unet: Any,
    vae: Any,
    conditioning: ConditioningStack,
    batch: dict[str, Any],
    *,
    scheduler: Any,
    steps: int,
    guidance: float,
    seed: int,
    height: int,
    width: int,
    noise_seeds: list[int] | None = None,
) -> Tensor:
    """Sample one image per entry of `batch` (conditions as in training); returns (B, 3, H, W) in [0, 1].

    Image i starts from noise seeded with `seed + i` (or `noise_seeds[i]`), so a grid is reproducible whatever
    the batch size.
    """
    size = len(next(iter(batch.values())))
    device, dtype = unet.device, unet.dtype
    cond = conditioning(batch, conditioning.constant_drop(size, False))
    uncond = conditioning(batch, conditioning.constant_drop(size, True)) if guidance > 1 else None
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    shape = (vae.config.latent_channels, height // scale, width // scale)
    seeds = noise_seeds if noise_seeds is not None else [seed + i for i in range(size)]
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
    scheduler.set_timesteps(steps, device=device)
    latents = torch.stack(noise).to(device, dtype) * scheduler.init_noise_sigma
    step_kwargs = {}
    if "generator" in inspect.signature(scheduler.step).parameters:
        step_kwargs["generator"] = torch.Generator(device=device).manual_seed(seed)
    for t in scheduler.timesteps:
        pred = _predict(unet, scheduler.scale_model_input(latents, t), t, cond, uncond, guidance)
        latents = scheduler.step(pred, t, latents, **step_kwargs).prev_sample
    images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)


def _predict(unet: Any, latents: Tensor, t: Tensor, cond: Any, uncond: Any, guidance: float) -> Tensor:
    if uncond is None:
        return unet(cond.unet_input(latents), t, encoder_hidden_states=cond.crossattn).sample
    both = torch.cat([uncond.unet_input(latents), cond.unet_input(latents)])
    context = torch.cat([uncond.crossattn, cond.crossattn]) if cond.crossattn is not None else None
    pred_uncond, pred_cond = unet(both, t, encoder_hidden_states=context).sample.chunk(2)
    return pred_uncond + guidance * (pred_cond - pred_uncond)


def to_pil(images: Tensor) -> list[Image.Image]:
    """(B, 3, H, W) floats in [0, 1] → PIL images."""
    arrays = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arrays]


def make_grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    """Tile equally sized images row by row."""
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    w, h = images[0].size
    grid = Image.new("RGB", (columns * w, rows * h))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * w, (i // columns) * h))
    return grid
