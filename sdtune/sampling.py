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
from sdtune.conditioning.text import with_micro_conditioning
from sdtune.models.loading import vae_scale_factor

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
    condition_guidance: dict[str, float] | None = None,
    guidance_rescale: float = 0.0,
    noise_seeds: list[int] | None = None,
) -> Tensor:
    """Sample one image per entry of `batch` (conditions as in training); returns (B, 3, H, W) in [0, 1].

    Image i starts from noise seeded with `seed + i` (or `noise_seeds[i]`), so a grid is reproducible whatever
    the batch size. Guidance is classifier-free over all conditions at once (`guidance`; the unconditional
    prediction drops every component), or, with `condition_guidance`, separate per condition: see
    `guidance_plan`. `guidance_rescale` mixes in the guided prediction rescaled to the conditional one's
    spread (`rescale_guidance`).
    """
    size = len(next(iter(batch.values())))
    device, dtype = unet.device, unet.dtype
    batch = with_micro_conditioning(batch, size, height, width)
    levels, scales = guidance_plan(list(conditioning.components), guidance, condition_guidance)
    conditions = [conditioning(batch, conditioning.keep_only(size, kept)) for kept in levels]
    scale = vae_scale_factor(vae)
    shape = (vae.config.latent_channels, height // scale, width // scale)
    seeds = noise_seeds if noise_seeds is not None else [seed + i for i in range(size)]
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
    scheduler.set_timesteps(steps, device=device)
    latents = torch.stack(noise).to(device, dtype) * scheduler.init_noise_sigma
    step_kwargs = {}
    if "generator" in inspect.signature(scheduler.step).parameters:
        step_kwargs["generator"] = torch.Generator(device=device).manual_seed(seed)
    for t in scheduler.timesteps:
        pred = _predict(
            unet, scheduler.scale_model_input(latents, t), t, conditions, scales, guidance_rescale
        )
        latents = scheduler.step(pred, t, latents, **step_kwargs).prev_sample
    images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)


def guidance_plan(
    names: list[str], guidance: float, condition_guidance: dict[str, float] | None = None
) -> tuple[list[set[str]], list[float]]:
    """Nested sets of kept conditions K_0 = ∅ ⊂ K_1 ⊂ … ⊂ K_n = all, and a scale s_k per step, for

        pred = ε(K_0) + Σ_k s_k · (ε(K_k) − ε(K_{k−1}))

    Without `condition_guidance` that is plain classifier-free guidance, ε(∅) + guidance · (ε(all) − ε(∅)),
    and with guidance ≤ 1 just ε(all). `condition_guidance` names conditions that get their own scale, added
    in that order before the rest (which use `guidance`): {source: 1.5} with text gives InstructPix2Pix's
    ε(∅) + 1.5 · (ε(source) − ε(∅)) + guidance · (ε(source, text) − ε(source)).
    """
    everything = set(names)
    if not condition_guidance:
        return ([set(), everything], [guidance]) if guidance > 1 else ([everything], [])
    unknown = [name for name in condition_guidance if name not in everything]
    if unknown:
        raise ValueError(f"condition_guidance: unknown condition(s) {unknown}; this model has {names}")
    levels, scales, kept = [set()], [], set()
    for name, scale in condition_guidance.items():
        kept = kept | {name}
        levels.append(kept)
        scales.append(float(scale))
    if kept != everything:
        levels.append(everything)
        scales.append(guidance)
    return levels, scales


def combine_guidance(predictions: list[Tensor], scales: list[float]) -> Tensor:
    """ε(K_0) + Σ_k s_k (ε(K_k) − ε(K_{k−1})) for the predictions of `guidance_plan`'s levels."""
    result = predictions[0]
    for k, scale in enumerate(scales, start=1):
        result = result + scale * (predictions[k] - predictions[k - 1])
    return result


def rescale_guidance(guided: Tensor, conditional: Tensor, phi: float) -> Tensor:
    """Guidance rescale (Lin et al., "Common Diffusion Noise Schedules and Sample Steps are Flawed", §3.4;
    diffusers' `guidance_rescale`): the guided prediction scaled, image by image, to the standard deviation of
    the fully conditional one, mixed in by `phi` (0 = plain guidance, 0.7 the paper's choice). Strong guidance
    inflates the prediction's spread, which over-exposes images, most of all with zero-terminal-SNR models."""
    if not phi:
        return guided
    dims = list(range(1, guided.ndim))
    rescaled = guided * (conditional.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * guided


def _predict(
    unet: Any, latents: Tensor, t: Tensor, conditions: list[Any], scales: list[float], rescale: float = 0.0
) -> Tensor:
    inputs = torch.cat([c.unet_input(latents) for c in conditions])
    context = None
    if conditions[0].crossattn is not None:
        context = torch.cat([c.crossattn for c in conditions])
    kwargs = {}
    if conditions[0].added is not None:
        added = conditions[0].added
        kwargs["added_cond_kwargs"] = {k: torch.cat([c.added[k] for c in conditions]) for k in added}
    predictions = unet(inputs, t, encoder_hidden_states=context, **kwargs).sample.chunk(len(conditions))
    guided = combine_guidance(list(predictions), scales)
    return rescale_guidance(guided, predictions[-1], rescale) if scales else guided


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
