"""Image preprocessing without torchvision: resize, crop, flip, normalise to [-1, 1]."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor


class ImageTransform:
    """Resize the shorter side to `resolution`, crop a square (centre or random), maybe flip."""

    def __init__(self, resolution: int, center_crop: bool = True, random_flip: bool = False) -> None:
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> Tensor:
        """`generator` drives the random crop and flip (the global RNG if None)."""
        return self.placed(image, generator)[0]

    def placed(
        self, image: Image.Image, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """(pixels, micro-conditioning): where the crop sits, as SDXL is conditioned on it (`placement`)."""
        image = to_rgb(ImageOps.exif_transpose(image))
        original = image.size
        image = self._resize(image)
        resized = image.size
        image, (left, top) = self._crop(image, generator)
        flip = bool(self.random_flip and torch.rand((), generator=generator) < 0.5)
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        pixels = torch.from_numpy(array).permute(2, 0, 1).contiguous()
        return pixels, placement(original, resized, (left, top), image.size, flip)

    def _resize(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        scale = self.resolution / min(w, h)
        if scale == 1:
            return image
        size = (max(self.resolution, round(w * scale)), max(self.resolution, round(h * scale)))
        return image.resize(size, Image.Resampling.BICUBIC)

    def _crop(
        self, image: Image.Image, generator: torch.Generator | None
    ) -> tuple[Image.Image, tuple[int, int]]:
        w, h = image.size
        r = self.resolution
        if self.center_crop:
            left, top = (w - r) // 2, (h - r) // 2
        else:
            left = int(torch.randint(0, w - r + 1, (), generator=generator))
            top = int(torch.randint(0, h - r + 1, (), generator=generator))
        return image.crop((left, top, left + r, top + r)), (left, top)


def placement(
    original: tuple[int, int],
    resized: tuple[int, int],
    left_top: tuple[int, int],
    crop: tuple[int, int],
    flip: bool,
) -> dict[str, Tensor]:
    """SDXL micro-conditioning of one sample: `original_size` (h, w) of the source image, `crop_top_left`
    (top, left) of the crop in the resized image, `target_size` (h, w) of the crop. Sizes are PIL (w, h).

    A flipped sample is conditioned on its crop's corner in the flipped image, as if it had been flipped
    before cropping.
    """
    left, top = left_top
    if flip:
        left = resized[0] - left - crop[0]
    return {
        "original_size": torch.tensor([original[1], original[0]]),
        "crop_top_left": torch.tensor([top, left]),
        "target_size": torch.tensor([crop[1], crop[0]]),
    }


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB. Transparency (RGBA, LA, PA, a palette's transparent colour) is composited onto white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")
