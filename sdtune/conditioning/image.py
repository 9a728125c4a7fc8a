"""A source image → its VAE latents, fed to the U-Net by concatenation (InstructPix2Pix-style edits)."""

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
