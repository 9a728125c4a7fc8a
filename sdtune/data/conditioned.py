"""The common shape of datasets whose samples carry a condition besides the caption (map, source, vector)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from sdtune.data.datamodule import ImageCaptionDataModule, collate
from sdtune.data.joint import JointTransform
from sdtune.data.records import Records, check
from sdtune.data.sampler import split_item

log = logging.getLogger(__name__)


class RecordDataset(Dataset):
    """A dataset over `self.records` whose samples `item` builds. An item is an index, or (index, augmentation
    seed) from `ResumableSampler`; `item(index, augment=False)` is the same sample without augmentation."""

    records: Records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        index, generator = split_item(item)
        return self.item(index, generator=generator)

    def item(
        self, index: int, augment: bool = True, generator: torch.Generator | None = None
    ) -> dict[str, Any]:
        raise NotImplementedError


class ConditionedDataModule(ImageCaptionDataModule):
    """Finds records under `root` (generating a shapes-world dataset when `root` is null), reports every bad
    sample before training (or skips and counts them with `on_bad_sample=skip`), and serves the fixed batch
    that validation samples are conditioned on (`condition_batch`).

    Subclasses implement `find_records`, `make_dataset` and `generate_root`, and list in `batch_keys` what
    their batches hold (config validation checks that each conditioning component's input is among them).
    """

    batch_keys: tuple[str, ...] = ("pixel_values", "caption")

    def __init__(self, num_images: int = 512, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_images = num_images
        self.seed = seed
        self.joint = JointTransform(
            self.transform.resolution, self.transform.center_crop, self.transform.random_flip
        )

    def prepare_data(self) -> None:
        self._ensure_root()

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        self._ensure_root()
        records = self.find_records()
        self.skipped = check(records, self.source, self.on_bad_sample)
        if self.skipped:
            log.warning(
                "skipping %d bad sample(s) in %s (data.on_bad_sample=skip)", len(self.skipped), self.source
            )
        self.dataset = self.make_dataset(records)

    def condition_batch(self, count: int) -> dict[str, Any]:
        """The first `count` samples without augmentation: what validation samples are conditioned on."""
        self.setup()
        return collate([self.dataset.item(i, augment=False) for i in range(min(count, len(self.dataset)))])

    def _ensure_root(self) -> None:
        if self.root is None:
            if self.cache_dir is None:
                raise ValueError(
                    f"{type(self).__name__} needs cache_dir (paths.cache_dir) when data.root is null"
                )
            self.root = str(self.generate_root())

    def find_records(self) -> Records:
        raise NotImplementedError

    def make_dataset(self, records: Records) -> Any:
        raise NotImplementedError

    def generate_root(self) -> Any:
        raise NotImplementedError


def oriented_size(path: Path) -> tuple[int, int]:
    """An image's (width, height) after its EXIF orientation, read from the header only."""
    with Image.open(path) as image:
        w, h = image.size
        orientation = image.getexif().get(0x0112, 1)
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)
