"""Images as conditions: a source image's VAE latents by concatenation (InstructPix2Pix-style edits), or an
image's CLIP embedding as cross-attention tokens (image prompts: IP-Adapter, SD image variations)."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn


class SourceImageConditioner(nn.Module):
    """Encodes `batch[key]` images ((B, 3, H, W) in [-1, 1]) with the stack's frozen VAE.

    As in diffusers' InstructPix2Pix, the latents are the posterior mode without the scaling factor, and the
    null condition (classifier-free guidance) is all zeros.
    """

    slot = "concat"
    input = "image"

    def __init__(self, stack: Any, dropout: float = 0.05, key: str = "source_pixel_values") -> None:
        super().__init__()
        self.vae = stack.vae
        self.channels = stack.vae.config.latent_channels
        self.dropout = dropout
        self.key = key

    @torch.no_grad()
    def forward(self, batch: dict[str, Any], drop: Tensor) -> Tensor:
        pixels = batch[self.key].to(self.vae.device, self.vae.dtype)
        latents = self.vae.encode(pixels).latent_dist.mode()
        return latents * (~drop).to(latents.device, latents.dtype)[:, None, None, None]

    def read_input(self, path: str, resolution: int) -> Tensor:
        """A (1, 3, H, W) batch entry from an image file (`sdtune.sample image=…`), centre-cropped."""
        from sdtune.data.joint import JointTransform

        with Image.open(path) as opened:
            return JointTransform(resolution)(opened.copy(), augment=False)[0][None]

    def visualize(self, batch: dict[str, Any]) -> list[Image.Image]:
        from sdtune.sampling import to_pil

        return to_pil((batch[self.key].float() / 2 + 0.5).clamp(0, 1))


class ImagePromptConditioner(nn.Module):
    """An image embedding through cross-attention (IP-Adapter's and SD image variations' image prompt):
    `batch[key]` images go through a frozen CLIP vision model (`sdtune.models.image_encoder`), and a small
    trainable projection (linear + layer norm) turns each image embedding into `tokens` tokens of the
    U-Net's cross-attention width, placed after the text tokens.

    `key: pixel_values` embeds the training image itself (image variations); with `data=pairs`,
    `key: source_pixel_values` embeds the source and the model learns to draw the target from it and the
    instruction. The null condition (classifier-free guidance) is all-zero tokens. The projection (and with
    `train_encoder`, the encoder) trains at the method's `text_encoder_lr` and is saved in the checkpoint and
    as `conditioning.safetensors`.
    """

    slot = "crossattn"
    input = "image_prompt"

    def __init__(
        self,
        stack: Any,
        encoder: str | None = None,
        tokens: int = 4,
        dropout: float = 0.1,
        key: str = "source_pixel_values",
        train_encoder: bool = False,
    ) -> None:
        super().__init__()
        from sdtune.models.image_encoder import load_image_encoder

        self.encoder = load_image_encoder(encoder)
        # Trained, the encoder's weights are saved with the projection (conditioning.safetensors).
        self.encoder.requires_grad_(train_encoder)
        width = stack.unet.config.cross_attention_dim
        self.tokens, self.width, self.dropout, self.key = tokens, width, dropout, key
        self.proj = nn.Linear(self.encoder.config.projection_dim, tokens * width)
        self.norm = nn.LayerNorm(width)

    @staticmethod
    def config_problems(component: Any, data: Any) -> list[str]:
        """Problems of this component's config (keys relative to it), found before any model loads."""
        from sdtune.models.image_encoder import encoder_problem

        problems = []
        trouble = encoder_problem(component.get("encoder"))
        if trouble:
            problems.append(f"encoder: {trouble}")
        tokens = component.get("tokens", 4)
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            problems.append(f"tokens: must be an integer >= 1, got {tokens!r}")
        if not isinstance(component.get("train_encoder", False), bool):
            problems.append(f"train_encoder: must be true or false, got {component.train_encoder!r}")
        if component.get("key") == "pixel_values" and data.get("cache_latents"):
            problems.append(
                "key: pixel_values embeds the training images, but data.cache_latents=true keeps only their "
                "latents; set data.cache_latents=false"
            )
        return problems

    def embed(self, pixels: Tensor) -> Tensor:
        """(B, projection_dim) image embeddings of (B, 3, H, W) pixels in [-1, 1]."""
        from sdtune.models.image_encoder import clip_pixels

        param = next(self.encoder.parameters())
        inputs = clip_pixels(pixels.to(param.device), self.encoder.config.image_size).to(param.dtype)
        with torch.set_grad_enabled(torch.is_grad_enabled() and param.requires_grad):
            return self.encoder(pixel_values=inputs).image_embeds

    def forward(self, batch: dict[str, Any], drop: Tensor) -> Tensor:
        embeds = self.embed(batch[self.key]).to(self.proj.weight.dtype)
        tokens = self.norm(self.proj(embeds).reshape(embeds.shape[0], self.tokens, self.width))
        return tokens * (~drop).to(tokens.device, tokens.dtype)[:, None, None]

    def read_input(self, path: str, resolution: int) -> Tensor:
        """A (1, 3, H, W) batch entry from an image file (`sdtune.sample image_prompt=…`), centre-cropped."""
        from sdtune.data.joint import JointTransform

        with Image.open(path) as opened:
            return JointTransform(resolution)(opened.convert("RGB"), augment=False)[0][None]

    def visualize(self, batch: dict[str, Any]) -> list[Image.Image]:
        from sdtune.sampling import to_pil

        return to_pil((batch[self.key].float() / 2 + 0.5).clamp(0, 1))
