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

    def __call__(self, image: Image.Image) -> Tensor:
        image = ImageOps.exif_transpose(image).convert("RGB")
        image = self._resize(image)
        image = self._crop(image)
        if self.random_flip and torch.rand(()) < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()

    def _resize(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        scale = self.resolution / min(w, h)
        if scale == 1:
            return image
        size = (max(self.resolution, round(w * scale)), max(self.resolution, round(h * scale)))
        return image.resize(size, Image.Resampling.BICUBIC)

    def _crop(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        r = self.resolution
        if self.center_crop:
            left, top = (w - r) // 2, (h - r) // 2
        else:
            left = int(torch.randint(0, w - r + 1, ()))
            top = int(torch.randint(0, h - r + 1, ()))
        return image.crop((left, top, left + r, top + r))
