"""The image encoder of image-prompt conditioning: a CLIP vision model with its projection.

`encoder: null` is the embedded tiny one (a small ViT built from a fixed seed: the same weights on every
machine, so a run that saved only its projection samples the same later); otherwise a local folder or a hub
id already in the Hugging Face cache holding a `CLIPVisionModelWithProjection` (or a full CLIP model, whose
vision half is read), e.g. `openai/clip-vit-large-patch14` as IP-Adapter and SD image variations use.
"""

from __future__ import annotations

from typing import Any

import torch

TINY_SEED = 20251126
TINY_CONFIG = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "projection_dim": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 64,
    "patch_size": 8,
}
# CLIP's pixel normalisation (the CLIPImageProcessor defaults).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def encoder_problem(name: str | None) -> str | None:
    """Why `name` cannot be loaded offline (None when it can), checked before any model loads."""
    if name is None:
        return None
    from sdtune.metrics import resolve_clip

    if resolve_clip(str(name)) is None:
        return (
            f"{name!r} is neither a local folder holding a CLIP vision model (config.json + weights) nor a "
            "hub id in the local Hugging Face cache; nothing is downloaded (null = the embedded tiny encoder)"
        )
    return None


def load_image_encoder(name: str | None) -> Any:
    """A frozen `CLIPVisionModelWithProjection` in eval mode."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    if name is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_SEED)
            encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CONFIG))
    else:
        from sdtune.metrics import resolve_clip

        source = resolve_clip(str(name))
        if source is None:
            raise FileNotFoundError(f"image encoder {name!r}: {encoder_problem(name)}")
        encoder = CLIPVisionModelWithProjection.from_pretrained(source, local_files_only=True)
    return encoder.requires_grad_(False).eval()


def clip_pixels(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, H, W) pixels in [-1, 1] → what a CLIP vision model takes: `size`², CLIP-normalised.

    The training crops are already square, so a resize is what CLIPImageProcessor's resize + centre crop do.
    """
    images = (pixels.float() / 2 + 0.5).clamp(0, 1)
    if images.shape[-2:] != (size, size):
        images = torch.nn.functional.interpolate(
            images, size=(size, size), mode="bicubic", antialias=True, align_corners=False
        ).clamp(0, 1)
    mean = torch.tensor(CLIP_MEAN, device=images.device)[:, None, None]
    std = torch.tensor(CLIP_STD, device=images.device)[:, None, None]
    return (images - mean) / std
