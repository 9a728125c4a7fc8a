"""Semantic maps → one-hot class channels at latent resolution, fed to the U-Net by concatenation."""

from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from sdtune.models.loading import vae_scale_factor

RESIZE_MODES = ("nearest", "area")


def one_hot_resized(
    labels: Tensor, num_classes: int, size: tuple[int, int], ignore_index: int, mode: str = "nearest"
) -> Tensor:
    """(B, H, W) class ids → (B, num_classes, h, w) class channels at `size`; `ignore_index` is no class.

    area: each latent pixel holds the fraction of its block of input pixels in each class, so a boundary
    inside a block still shows where it lies (an 8× smaller latent would otherwise quantise every outline to
    8 pixels). nearest: each latent pixel takes the class at the centre of its block ("nearest-exact").
    """
    if mode == "area":
        valid = labels != ignore_index
        full = F.one_hot(torch.where(valid, labels, 0).long(), num_classes) * valid[..., None]
        return F.interpolate(full.permute(0, 3, 1, 2).float(), size=size, mode="area")
    resized = F.interpolate(labels[:, None].float(), size=size, mode="nearest-exact")[:, 0].long()
    valid = resized != ignore_index
    one_hot = F.one_hot(torch.where(valid, resized, 0), num_classes) * valid[..., None]
    return one_hot.permute(0, 3, 1, 2).float()


class SemanticMapConditioner(nn.Module):
    """Encodes `batch[key]` label maps ((B, H, W) class ids at image resolution) as one-hot concat channels.

    The null condition (classifier-free guidance) is the all-zero map, i.e. "no class anywhere". `palette`
    (the data's palette file, if any) reads RGB maps given to `sdtune.sample` and colours the maps shown
    beside validation samples.
    """

    slot = "concat"
    input = "map"
    resize_modes = RESIZE_MODES

    def __init__(
        self,
        stack: Any,
        num_classes: int,
        ignore_index: int = 255,
        dropout: float = 0.1,
        key: str = "map",
        palette: str | None = None,
        resize: str = "area",
    ) -> None:
        super().__init__()
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize: {resize!r}; valid: {', '.join(RESIZE_MODES)}")
        self.resize = resize
        self.channels = num_classes
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.dropout = dropout
        self.key = key
        self.palette_file = palette
        self.palette = _palette(palette, num_classes)
        self.downscale = vae_scale_factor(stack.vae)

    def forward(self, batch: dict[str, Any], drop: Tensor) -> Tensor:
        labels = batch[self.key]
        size = (labels.shape[-2] // self.downscale, labels.shape[-1] // self.downscale)
        maps = one_hot_resized(labels, self.num_classes, size, self.ignore_index, self.resize)
        return maps * (~drop).to(maps.device, maps.dtype)[:, None, None, None]

    def read_input(self, path: str, resolution: int) -> Tensor:
        """A (1, H, W) batch entry from a label-map file (`sdtune.sample map=…`), centre-cropped."""
        from sdtune.data.joint import JointTransform
        from sdtune.data.semantic import label_problem, load_palette, read_label_map

        palette = load_palette(self.palette_file) if self.palette_file else None
        labels = read_label_map(Path(path), palette)
        problem = label_problem(labels, self.num_classes, self.ignore_index)
        if problem:
            raise ValueError(problem)
        image = Image.new("RGB", (labels.shape[1], labels.shape[0]))
        return JointTransform(resolution)(image, labels={"map": labels}, augment=False)[1]["map"][None]

    def visualize(self, batch: dict[str, Any]) -> list[Image.Image]:
        return [colourise(labels.cpu().numpy(), self.palette) for labels in batch[self.key]]


def _palette(path: str | None, num_classes: int) -> np.ndarray:
    """The colours maps are shown in: `data.palette` when the maps are RGB, else `default_palette`."""
    if path is None:
        return np.asarray(default_palette(num_classes), np.uint8)
    from sdtune.data.semantic import load_palette

    return load_palette(path)


def default_palette(num_classes: int) -> list[list[int]]:
    """Distinct colours: black for class 0, evenly spaced hues for the others."""
    colours = [[0, 0, 0]]
    for i in range(1, num_classes):
        r, g, b = colorsys.hsv_to_rgb((i - 1) / max(num_classes - 1, 1), 0.75, 0.95)
        colours.append([round(r * 255), round(g * 255), round(b * 255)])
    return colours


def colourise(labels: np.ndarray, palette: np.ndarray) -> Image.Image:
    """An (H, W) class-id map as an RGB image; ids outside the palette (e.g. ignore_index) are white."""
    known = (labels >= 0) & (labels < len(palette))
    rgb = np.full((*labels.shape, 3), 255, np.uint8)
    rgb[known] = palette[labels[known]]
    return Image.fromarray(rgb)
