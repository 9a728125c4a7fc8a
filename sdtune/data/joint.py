"""One random resize/crop/flip applied identically to an image and the things aligned with it.

Label maps are resized nearest-neighbour (class ids never blend) and come out as (H, W) int64 tensors; aligned
images (e.g. the source of an edit pair) are resized like the main image and come out in [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor


@dataclass
class JointTransform:
    """Resize the shorter side to `resolution`, crop a square (centre or random), maybe flip: same for all."""

    resolution: int
    center_crop: bool = True
    random_flip: bool = False

    def __call__(
        self,
        image: Image.Image,
        images: dict[str, Image.Image] | None = None,
        labels: dict[str, np.ndarray] | None = None,
        augment: bool = True,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """(main image in [-1, 1], {key: aligned tensor}); `augment=False` uses the centre crop, no flip.

        `generator` drives the random crop and flip (the global RNG if None).
        """
        image = ImageOps.exif_transpose(image).convert("RGB")
        size, box, flip = self._params(image.size, augment, generator)
        out = {
            key: _pixels(self._apply(_rgb(im), size, box, flip, Image.Resampling.BICUBIC))
            for key, im in (images or {}).items()
        }
        for key, array in (labels or {}).items():
            label_image = Image.fromarray(array.astype(np.int32))  # mode "I"
            resized = self._apply(label_image, size, box, flip, Image.Resampling.NEAREST)
            out[key] = torch.from_numpy(np.asarray(resized, dtype=np.int64).copy())
        return _pixels(self._apply(image, size, box, flip, Image.Resampling.BICUBIC)), out

    def _params(
        self, size: tuple[int, int], augment: bool, generator: torch.Generator | None = None
    ) -> tuple[tuple[int, int], tuple, bool]:
        w, h = size
        r = self.resolution
        scale = r / min(w, h)
        resized = (max(r, round(w * scale)), max(r, round(h * scale)))
        if self.center_crop or not augment:
            left, top = (resized[0] - r) // 2, (resized[1] - r) // 2
        else:
            left = int(torch.randint(0, resized[0] - r + 1, (), generator=generator))
            top = int(torch.randint(0, resized[1] - r + 1, (), generator=generator))
        flip = augment and self.random_flip and bool(torch.rand((), generator=generator) < 0.5)
        return resized, (left, top, left + r, top + r), flip

    @staticmethod
    def _apply(
        image: Image.Image, size: tuple[int, int], box: tuple, flip: bool, resample: int
    ) -> Image.Image:
        if image.size != size:
            image = image.resize(size, resample)
        image = image.crop(box)
        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else image


def _rgb(image: Image.Image) -> Image.Image:
    return ImageOps.exif_transpose(image).convert("RGB")


def _pixels(image: Image.Image) -> Tensor:
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
