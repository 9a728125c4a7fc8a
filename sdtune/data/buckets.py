"""Aspect-ratio bucketing: images train at the bucket size nearest their aspect ratio, every batch from one
bucket.

Buckets have roughly the pixel count of `resolution`² (sides multiples of 64, or of 8 below 256 px). Each
image goes to the bucket of nearest log aspect ratio; buckets with fewer images than one batch are folded into
their nearest neighbour, so padding a bucket to whole batches repeats few images. `BucketSampler` yields whole
single-bucket batches, shares them disjointly among DDP ranks and resumes mid-epoch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler

from sdtune.data.records import Records
from sdtune.data.sampler import split_item
from sdtune.data.transforms import placement

Size = tuple[int, int]  # (width, height)


def bucket_sizes(resolution: int, max_aspect: float = 2.0, step: int | None = None) -> list[Size]:
    """(width, height) pairs with width·height ≤ resolution², sides multiples of `step`, aspect ≤ max."""
    step = step or (64 if resolution >= 256 else 8)
    area = resolution * resolution
    sizes = set()
    for width in range(step, int(resolution * max_aspect) + step, step):
        height = (area // width) // step * step
        if height >= step and max(width / height, height / width) <= max_aspect + 1e-9:
            sizes.add((width, height))
    return sorted(sizes)


@dataclass
class Buckets:
    """Which bucket each sample trains in."""

    sizes: list[Size]  # bucket id → (width, height)
    ids: list[int]  # sample index → bucket id

    def size_of(self, index: int) -> Size:
        return self.sizes[self.ids[index]]

    def counts(self) -> dict[Size, int]:
        out: dict[Size, int] = {}
        for bucket in self.ids:
            out[self.sizes[bucket]] = out.get(self.sizes[bucket], 0) + 1
        return out


def assign_buckets(
    image_sizes: list[Size], resolution: int, batch_size: int, max_aspect: float = 2.0
) -> Buckets:
    """Bucket of nearest aspect ratio for each image; buckets under one batch merge into the nearest."""
    sizes = bucket_sizes(resolution, max_aspect)
    ratios = [math.log(w / h) for w, h in sizes]
    ids = [min(range(len(sizes)), key=lambda b: abs(math.log(w / h) - ratios[b])) for w, h in image_sizes]
    while True:
        counts = {b: ids.count(b) for b in set(ids)}
        small = [b for b, n in counts.items() if n < batch_size]
        if not small or len(counts) == 1:
            break
        smallest = min(small, key=lambda b: (counts[b], b))
        target = min((b for b in counts if b != smallest), key=lambda b: abs(ratios[b] - ratios[smallest]))
        ids = [target if b == smallest else b for b in ids]
    return Buckets(sizes, ids)


def read_image_sizes(records: Records, image_column: str = "image") -> list[Size]:
    """(width, height) of every record as it will be seen (EXIF orientation applied), reading headers only."""
    sizes = []
    for index in range(len(records)):
        if records.hf_dataset is not None:
            image = records.hf_dataset[records.images[index]][image_column]
            sizes.append(ImageOps.exif_transpose(image).size)
            continue
        with Image.open(records.images[index]) as image:
            width, height = image.size
            if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # rotated by 90°
                width, height = height, width
            sizes.append((width, height))
    return sizes


def open_image(records: Records, index: int, image_column: str = "image") -> Image.Image:
    """The record's image, loaded into memory."""
    if records.hf_dataset is not None:
        return records.hf_dataset[records.images[index]][image_column]
    with Image.open(records.images[index]) as opened:
        return opened.copy()


def fit_image(
    image: Image.Image,
    size: Size,
    center_crop: bool = True,
    flip: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Resize to cover `size`, crop to it (centre or random), maybe flip; pixels in [-1, 1], (3, H, W).

    For a square `size` this is exactly `sdtune.data.transforms.ImageTransform`.
    """
    return fit_image_placed(image, size, center_crop, flip, generator)[0]


def fit_image_placed(
    image: Image.Image,
    size: Size,
    center_crop: bool = True,
    flip: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """`fit_image` and the crop's micro-conditioning (`sdtune.data.transforms.placement`)."""
    image = ImageOps.exif_transpose(image).convert("RGB")
    original = image.size
    width, height = size
    (w, h) = resized = covering_size(original, size)
    if resized != original:
        image = image.resize(resized, Image.Resampling.BICUBIC)
    if center_crop:
        left, top = (w - width) // 2, (h - height) // 2
    else:
        left = int(torch.randint(0, w - width + 1, (), generator=generator))
        top = int(torch.randint(0, h - height + 1, (), generator=generator))
    image = image.crop((left, top, left + width, top + height))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    pixels = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    return pixels, placement(original, (w, h), (left, top), size, flip)


def covering_size(image_size: Size, size: Size) -> Size:
    """The size an image is resized to so that it covers `size` (before the crop); both (width, height)."""
    (w, h), (width, height) = image_size, size
    scale = max(width / w, height / h)
    if scale == 1:
        return image_size
    return max(width, round(w * scale)), max(height, round(h * scale))


def centre_placement(image_size: Size, size: Size, flip: bool = False) -> dict[str, Tensor]:
    """The micro-conditioning of `fit_image`'s centre crop of an image of `image_size`, without the pixels."""
    (w, h), (width, height) = covering_size(image_size, size), size
    return placement(image_size, (w, h), ((w - width) // 2, (h - height) // 2), size, flip)


class BucketedDataset(Dataset):
    """Pixels at each sample's bucket size, its caption, and where its crop lies (SDXL micro-conditioning)."""

    def __init__(
        self,
        records: Records,
        buckets: Buckets,
        center_crop: bool = True,
        random_flip: bool = False,
        image_column: str = "image",
    ) -> None:
        self.records = records
        self.buckets = buckets
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.image_column = image_column

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        index, generator = split_item(item)
        flip = self.random_flip and bool(torch.rand((), generator=generator) < 0.5)
        image = open_image(self.records, index, self.image_column)
        size = self.buckets.size_of(index)
        pixels, placement = fit_image_placed(image, size, self.center_crop, flip, generator)
        return {"pixel_values": pixels, "caption": self.records.captions[index], **placement}


# (epoch, batches of it already trained) from the trainer; None outside a Trainer.
Position = Callable[[], "tuple[int, int] | None"]


class BucketSampler(DistributedSampler):
    """Sample indices in whole single-bucket batches of `batch_size`, seeded per epoch.

    Each epoch: every bucket's samples are shuffled and padded (with repeats of its own samples) to whole
    batches, the batches are shuffled, padded to a multiple of `num_replicas`, and rank r takes batches
    r, r + num_replicas, …. Every rank sees the same number of batches; with a DataLoader of the same
    `batch_size` each batch is one bucket. Resume: `position()` (the trainer's progress) or `load_state_dict`
    says where the next iteration starts. A `DistributedSampler` so that Lightning leaves it in place.
    """

    def __init__(
        self,
        bucket_ids: list[int],
        batch_size: int,
        seed: int = 0,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        position: Position | None = None,
    ) -> None:
        if not bucket_ids:
            raise ValueError("BucketSampler needs at least one sample")
        self.bucket_ids = list(bucket_ids)
        self.batch_size = batch_size
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.position = position
        self.epoch = 0
        self.batches_done = 0  # of `self.epoch`, by this rank
        counts = [self.bucket_ids.count(b) for b in sorted(set(self.bucket_ids))]
        total = sum(math.ceil(n / batch_size) for n in counts)
        self.batches_per_rank = math.ceil(total / num_replicas)
        self.num_samples = self.batches_per_rank * batch_size
        self.total_size = self.num_samples * num_replicas
        self.shuffle = True
        self.drop_last = False

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.batches_done = epoch, 0

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All ranks' batches of `epoch`, in order (rank r takes every num_replicas-th from r)."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        batches = []
        for bucket in sorted(set(self.bucket_ids)):
            members = [i for i, b in enumerate(self.bucket_ids) if b == bucket]
            members = [members[i] for i in torch.randperm(len(members), generator=generator).tolist()]
            whole = math.ceil(len(members) / self.batch_size) * self.batch_size
            padded = [members[i % len(members)] for i in range(whole)]
            batches += [padded[i : i + self.batch_size] for i in range(0, len(padded), self.batch_size)]
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        total = self.batches_per_rank * self.num_replicas
        return [batches[i % len(batches)] for i in range(total)]

    def rank_batches(self, epoch: int) -> list[list[int]]:
        return self.epoch_batches(epoch)[self.rank :: self.num_replicas]

    def start(self) -> tuple[int, int]:
        """(epoch, batches of it to skip) where the next iteration begins."""
        where = self.position() if self.position is not None else None
        epoch, done = where if where is not None else (self.epoch, self.batches_done)
        return epoch + done // self.batches_per_rank, done % self.batches_per_rank

    def __iter__(self) -> Iterator[int]:
        epoch, first = self.start()
        self.epoch, self.batches_done = epoch, first
        for batch in self.rank_batches(epoch)[first:]:
            self.batches_done += 1
            yield from batch

    def state_dict(self) -> dict[str, int]:
        """Where iteration stands: resuming from it continues with the next batch this sampler yields."""
        return {"epoch": self.epoch, "batches_done": self.batches_done, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batches_done, self.seed = state["epoch"], state["batches_done"], state["seed"]


def trainer_position(trainer: Any) -> tuple[int, int] | None:
    """(epoch, batches of it trained) from a Lightning trainer's progress (restored from a checkpoint)."""
    if trainer is None:
        return None
    loop = trainer.fit_loop
    return loop.epoch_progress.current.completed, loop.epoch_loop.batch_progress.current.processed
