"""The shapes-world judge: reads background colour, foreground colour and shape class off an image.

Colours are measured, not learned: the background is the median of the image border (shapes never touch it),
the foreground is every pixel far from that background, and each is named by the nearest palette colour.
The shape is named by a small CNN that sees only the foreground mask, so it does not care about colours; it is
trained on fresh renders of every class (held-out ones included), half of them with blur and noise and half
passed through the tiny stack's autoencoder, so that the softer edges and small blemishes of generated images
do not fool it. Its weights ship in `sdtune/assets/judge.safetensors`;
`scripts/train_judge.py` re-trains them and reports the accuracy on fresh renders.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from sdtune.data.shapes import BACKGROUNDS, COLOURS, SHAPES, render, sample_spec

JUDGE_WEIGHTS = Path(__file__).parent / "assets" / "judge.safetensors"
MASK_DISTANCE = 60.0
"""RGB distance (0-255 scale) from the background beyond which a pixel counts as foreground."""
MASK_SOFTNESS = 100.0
MIN_FOREGROUND = 12
"""Fewer foreground pixels than this: no shape was drawn."""
NONE = "none"


@dataclass(frozen=True)
class Verdict:
    """What the judge reads off one image."""

    background: str
    colour: str
    shape: str
    foreground_pixels: int

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


class ShapeNet(nn.Module):
    """A small CNN over a (1, H, W) foreground mask → logits of `SHAPES`."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = [1, 16, 32, 64, 64]
        for c_in, c_out in zip(channels, channels[1:]):
            layers += [
                nn.Conv2d(c_in, c_out, 3, padding=1),
                nn.GroupNorm(8, c_out),
                nn.SiLU(),
                nn.MaxPool2d(2),
            ]
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64 * 4, len(SHAPES)))

    def forward(self, masks: Tensor) -> Tensor:
        return self.head(self.features(masks))


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    colours = np.array([palette[n] for n in names], dtype=np.float32)
    return names[int(np.argmin(((colours - rgb) ** 2).sum(axis=1)))]


def border_colour(image: np.ndarray, width: int = 2) -> np.ndarray:
    """Median RGB of the outer `width` pixels of an (H, W, 3) image."""
    border = np.concatenate(
        [
            image[:width].reshape(-1, 3),
            image[-width:].reshape(-1, 3),
            image[:, :width].reshape(-1, 3),
            image[:, -width:].reshape(-1, 3),
        ]
    )
    return np.median(border, axis=0)


def foreground(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(soft mask in [0, 1], hard mask) of the pixels that differ from the border colour."""
    distance = np.linalg.norm(image.astype(np.float32) - border_colour(image), axis=2)
    return np.clip(distance / MASK_SOFTNESS, 0.0, 1.0), distance > MASK_DISTANCE


def image_array(image: Image.Image | np.ndarray) -> np.ndarray:
    return np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)


class Judge:
    """Scores shapes-world images; `Judge.load()` uses the shipped classifier weights."""

    def __init__(self, net: ShapeNet) -> None:
        self.net = net.eval()

    @classmethod
    def load(cls, path: Path = JUDGE_WEIGHTS) -> Judge:
        from safetensors.torch import load_file

        if not path.is_file():
            raise FileNotFoundError(f"judge weights {path} are missing; run scripts/train_judge.py")
        net = ShapeNet()
        net.load_state_dict(load_file(str(path)))
        return cls(net)

    @torch.no_grad()
    def __call__(self, images: list[Image.Image] | list[np.ndarray]) -> list[Verdict]:
        arrays = [image_array(image) for image in images]
        masks = [foreground(a) for a in arrays]
        soft = torch.from_numpy(np.stack([m[0] for m in masks])[:, None]).float()
        shapes = self.net(soft).argmax(dim=1).tolist() if arrays else []
        verdicts = []
        for array, (_, hard), shape in zip(arrays, masks, shapes):
            count = int(hard.sum())
            drawn = count >= MIN_FOREGROUND
            verdicts.append(
                Verdict(
                    background=_nearest(border_colour(array), BACKGROUNDS),
                    colour=_nearest(np.median(array[hard], axis=0), COLOURS) if drawn else NONE,
                    shape=SHAPES[shape] if drawn else NONE,
                    foreground_pixels=count,
                )
            )
        return verdicts


def degrade(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blur and noise like a small generator's output: what the classifier must see through."""
    from PIL import ImageFilter

    radius = float(rng.uniform(0.0, 1.5))
    blurred = Image.fromarray(image.astype(np.uint8)).filter(ImageFilter.GaussianBlur(radius))
    noisy = np.asarray(blurred, dtype=np.float32) + rng.normal(0.0, rng.uniform(0.0, 12.0), image.shape)
    return np.clip(noisy, 0, 255)


def render_batch(
    rng: np.random.Generator, count: int, resolution: int, degraded: bool
) -> tuple[Tensor, Tensor, list[np.ndarray]]:
    """(soft masks (N, 1, H, W), shape labels (N,), images) of `count` fresh renders of every class."""
    images, labels = [], []
    for _ in range(count):
        spec = sample_spec(rng)
        image = image_array(render(spec, resolution)[0])
        images.append(degrade(image, rng) if degraded else image)
        labels.append(SHAPES.index(spec.shape))
    masks = np.stack([foreground(image)[0] for image in images])[:, None]
    return torch.from_numpy(masks).float(), torch.tensor(labels), images


@torch.no_grad()
def reconstruct(vae: Any, images: list[np.ndarray]) -> list[np.ndarray]:
    """Images (H, W, 3 in 0..255) through an autoencoder and back: blemishes like generated images have."""
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    decoded = vae.decode(vae.encode(pixels).latent_dist.sample()).sample.clamp(-1, 1)
    return list(((decoded.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round())


def train_shape_net(
    steps: int, batch_size: int = 64, resolution: int = 64, seed: int = 0, vae: Any = None
) -> ShapeNet:
    """Train the shape classifier on fresh degraded renders (deterministic for a seed); with `vae`, half of
    every batch goes through it first."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = ShapeNet()
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    for _ in range(steps):
        masks, labels, images = render_batch(rng, batch_size, resolution, degraded=vae is None)
        if vae is not None:
            half = batch_size // 2
            mixed = reconstruct(vae, images[:half]) + [degrade(image, rng) for image in images[half:]]
            masks = torch.from_numpy(np.stack([foreground(image)[0] for image in mixed])[:, None]).float()
        loss = nn.functional.cross_entropy(net(masks), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return net.eval()


def accuracy_on_renders(judge: Judge, count: int, seed: int, resolution: int = 64) -> dict[str, float]:
    """The judge's accuracy (colour, background, shape) on fresh clean renders it was not trained on."""
    rng = np.random.default_rng([seed, 7])
    specs = [sample_spec(rng) for _ in range(count)]
    verdicts = judge([render(spec, resolution)[0] for spec in specs])
    return {
        "colour": float(np.mean([v.colour == s.colour for v, s in zip(verdicts, specs)])),
        "background": float(np.mean([v.background == s.background for v, s in zip(verdicts, specs)])),
        "shape": float(np.mean([v.shape == s.shape for v, s in zip(verdicts, specs)])),
        "n": count,
    }
