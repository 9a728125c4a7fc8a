"""DreamBooth data: a few images of one subject with one prompt, plus class images for prior preservation.

Every batch holds `batch_size` instance images followed by as many class images; `is_class` marks the class
rows, so the module adds `method.prior_loss_weight` × their mean loss to the instance loss.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from sdtune.conditioning.text import MICRO_CONDITIONING
from sdtune.data.class_images import (
    default_class_dir,
    ensure_class_images,
    generation_device,
    list_images,
    model_renderer,
    process_rank,
    stack_on,
)
from sdtune.data.records import IMAGE_SUFFIXES, DataError
from sdtune.data.transforms import ImageTransform

log = logging.getLogger(__name__)


class DreamBoothDataset(Dataset):
    """Instance image i % n with the instance prompt, and (with class images) class image i % m."""

    def __init__(
        self,
        transform: ImageTransform,
        instance_images: list[Path],
        instance_prompt: str,
        class_images: list[Path] | None = None,
        class_prompt: str | None = None,
    ) -> None:
        self.transform = transform
        self.instance_images = instance_images
        self.instance_prompt = instance_prompt
        self.class_images = class_images or []
        self.class_prompt = class_prompt

    def __len__(self) -> int:
        return max(len(self.instance_images), len(self.class_images))

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Pixels, caption and crop placement (SDXL micro-conditioning), and the same for a class image."""
        pixels, placement = self._load(self.instance_images[index % len(self.instance_images)])
        item = {"pixel_values": pixels, "caption": self.instance_prompt, **placement}
        if self.class_images:
            pixels, placement = self._load(self.class_images[index % len(self.class_images)])
            item["class_pixel_values"] = pixels
            item["class_caption"] = self.class_prompt
            item.update({f"class_{key}": value for key, value in placement.items()})
        return item

    def _load(self, path: Path) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with Image.open(path) as image:
            return self.transform.placed(image)


def collate_with_class(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Instance samples, then their class samples, in one batch; `is_class` marks the second half."""
    with_class = "class_pixel_values" in samples[0]
    halves = ("", "class_") if with_class else ("",)
    batch: dict[str, Any] = {
        "pixel_values": torch.stack([s[f"{half}pixel_values"] for half in halves for s in samples]),
        "caption": [s[f"{half}caption"] for half in halves for s in samples],
    }
    for key in MICRO_CONDITIONING:
        batch[key] = torch.stack([s[f"{half}{key}"] for half in halves for s in samples])
    if with_class:
        batch["is_class"] = torch.arange(len(batch["caption"])) >= len(samples)
    return batch


class DreamBoothDataModule(pl.LightningDataModule):
    """Instance images from `instance_dir` (or a shapes-world subject); class images generated if missing.

    Prior preservation is on when `class_prompt` is set. The class images need the base model, so they are
    made in `prepare_with_model` (called by `sdtune.train` once the stack is loaded, before training).
    """

    def __init__(
        self,
        name: str,
        instance_prompt: str,
        resolution: int,
        batch_size: int,
        instance_dir: str | None = None,
        class_prompt: str | None = None,
        class_dir: str | None = None,
        num_class_images: int = 100,
        class_generation: Any = None,
        synthetic: Any = None,
        center_crop: bool = True,
        random_flip: bool = False,
        num_workers: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.instance_dir = instance_dir
        self.instance_prompt = instance_prompt
        self.class_prompt = class_prompt
        self.class_dir = class_dir
        self.num_class_images = num_class_images
        # Plain dicts work too (the config gives DictConfigs): both are read by attribute.
        self.class_generation = OmegaConf.create(class_generation) if class_generation is not None else None
        self.synthetic = OmegaConf.create(synthetic) if synthetic is not None else None
        self.resolution = resolution
        self.transform = ImageTransform(resolution, center_crop, random_flip)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.instance_images: list[Path] = []
        self.class_images: list[Path] = []
        self.dataset: DreamBoothDataset | None = None
        self.skipped: list[tuple[str, str]] = []

    @property
    def with_prior(self) -> bool:
        return self.class_prompt is not None

    @property
    def num_samples(self) -> int:
        return len(self.instance_images)

    def prepare_data(self) -> None:
        self._ensure_instance_dir()

    def setup(self, stage: str | None = None) -> None:
        """List and check the instance images (and class images already there); raises DataError."""
        if self.instance_images:
            return
        folder = self._ensure_instance_dir()
        self.instance_images = list_images(folder)
        if not self.instance_images:
            raise DataError(
                f"data.instance_dir: no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}; "
                "put a few images of your subject there"
            )
        present = list_images(Path(self.class_dir).expanduser()) if self.class_dir else []
        _check_readable(self.instance_images + present)
        if not self.with_prior:
            self.dataset = DreamBoothDataset(self.transform, self.instance_images, self.instance_prompt)

    def prepare_with_model(self, stack: Any, conditioning: Any, accelerator: str) -> None:
        """Generate this rank's share of the missing class images with the base model; build the dataset."""
        if self.dataset is not None:
            return
        self.setup()
        folder = Path(self.class_dir).expanduser() if self.class_dir else self._default_class_dir(stack)
        render = model_renderer(
            stack, conditioning, self.class_prompt, self.class_generation, self.resolution
        )
        rank, world_size = process_rank()
        device = generation_device(accelerator)
        self.class_images = ensure_class_images(
            folder,
            self.num_class_images,
            render,
            self.class_generation.batch_size,
            rank,
            world_size,
            prepare=lambda: stack_on(stack, device),
        )
        log.info("%d class images in %s", len(self.class_images), folder)
        self.dataset = DreamBoothDataset(
            self.transform, self.instance_images, self.instance_prompt, self.class_images, self.class_prompt
        )

    def train_dataloader(self) -> DataLoader:
        if self.dataset is None:
            raise RuntimeError(
                "class images are missing: call prepare_with_model(stack, ...) before training"
            )
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            collate_fn=collate_with_class,
            persistent_workers=self.num_workers > 0,
            drop_last=len(self.dataset) >= self.batch_size,
        )

    def _ensure_instance_dir(self) -> Path:
        """`instance_dir`, or the synthetic subject's images, generated once into the cache."""
        if self.instance_dir is not None:
            return Path(self.instance_dir).expanduser()
        from sdtune.data.shapes import ensure_dataset

        if self.cache_dir is None:
            raise ValueError(
                "DreamBoothDataModule needs cache_dir (paths.cache_dir) when data.instance_dir is null"
            )
        s = self.synthetic
        root = ensure_dataset(
            self.cache_dir, s.num_images, self.resolution, s.seed, (s.shape,), (s.colour,), (s.background,)
        )
        return root / "images"

    def _default_class_dir(self, stack: Any) -> Path:
        if self.cache_dir is None:
            raise ValueError(
                "DreamBoothDataModule needs cache_dir (paths.cache_dir) when data.class_dir is null"
            )
        return default_class_dir(
            self.cache_dir, stack.base_model, self.class_prompt, self.resolution, self.class_generation
        )


def _check_readable(paths: list[Path]) -> None:
    """Raise DataError listing every image file PIL cannot read."""
    bad = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as error:  # PIL raises many kinds for broken files
            bad.append(f"  - {path}: {type(error).__name__}: {error}")
    if bad:
        raise DataError(f"{len(bad)} unreadable image(s):\n" + "\n".join(bad) + "\nRemove or replace them.")
