"""Lightning DataModules: real image/caption folders and the embedded shapes world."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from sdtune.data.buckets import (
    BucketedDataset,
    Buckets,
    BucketSampler,
    assign_buckets,
    read_image_sizes,
    trainer_position,
)
from sdtune.data.captions import AugmentedCaptions, TagAugment
from sdtune.data.fingerprint import dataset_summary
from sdtune.data.records import Records, check, discover
from sdtune.data.sampler import ResumableDataLoader, ResumableSampler, split_item
from sdtune.data.transforms import ImageTransform
from sdtune.data.validation import check_images

log = logging.getLogger(__name__)


class ImageCaptionDataset(Dataset):
    """Pixels in [-1, 1], the caption of each record, and where its crop lies (SDXL micro-conditioning)."""

    def __init__(self, records: Records, transform: ImageTransform, image_column: str = "image") -> None:
        self.records = records
        self.transform = transform
        self.image_column = image_column

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        """`item` is an index, or (index, augmentation seed) from `ResumableSampler`."""
        index, generator = split_item(item)
        ref = self.records.images[index]
        if self.records.hf_dataset is not None:
            image = self.records.hf_dataset[ref][self.image_column]
        else:
            with Image.open(ref) as opened:
                image = opened.copy()
        pixels, placement = self.transform.placed(image, generator)
        return {"pixel_values": pixels, "caption": self.records.captions[index], **placement}


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors, keep everything else (captions, names) as lists."""
    batch: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch


class ImageCaptionDataModule(pl.LightningDataModule):
    """Images with captions from a folder or a Hugging Face dataset (see `sdtune.data.records.discover`)."""

    def __init__(
        self,
        name: str,
        resolution: int,
        batch_size: int,
        root: str | None = None,
        hf_name: str | None = None,
        hf_split: str = "train",
        image_column: str = "image",
        caption_column: str = "text",
        caption_extension: str = ".txt",
        center_crop: bool = True,
        random_flip: bool = False,
        num_workers: int = 0,
        on_bad_sample: str = "error",
        cache_dir: str | None = None,
        shuffle_seed: int | None = None,
        bucketing: bool = False,
        bucket_max_aspect: float = 2.0,
        cache_latents: bool = False,
        latent_cache_dir: str | None = None,
        shuffle_caption: bool = False,
        keep_tokens: int = 0,
        caption_separator: str = ",",
        caption_tag_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.name = name
        self.root = root
        self.hf_name = hf_name
        self.discover_kwargs = {
            "hf_split": hf_split,
            "image_column": image_column,
            "caption_column": caption_column,
            "caption_extension": caption_extension,
        }
        self.transform = ImageTransform(resolution, center_crop, random_flip)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.on_bad_sample = on_bad_sample
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.shuffle_seed = shuffle_seed  # None: the run's seed (torch.initial_seed() after seed_everything)
        self.dataset: Dataset | None = None
        self.skipped: list[tuple[str, str]] = []
        self.summary: dict[str, Any] | None = None  # what the run trains on (sdtune.data.fingerprint)
        self.bucketing, self.bucket_max_aspect = bucketing, bucket_max_aspect
        self.buckets: Buckets | None = None  # set by setup() when bucketing
        self.records: Records | None = None
        # The latent/text cache is built by `sdtune.data.cache.prepare_cache` once the stack is loaded.
        self.cache_latents, self.latent_cache_dir = cache_latents, latent_cache_dir
        self.caption_tags = (
            TagAugment(keep_tokens, caption_separator, shuffle_caption, caption_tag_dropout)
            if shuffle_caption or caption_tag_dropout
            else None
        )

    @property
    def source(self) -> str:
        return self.hf_name or str(self.root)

    def setup(self, stage: str | None = None) -> None:
        """Discover and check the records, images included (raises DataError listing every bad sample)."""
        if self.dataset is not None:
            return
        records = discover(self.root, self.hf_name, **self.discover_kwargs)
        column = self.discover_kwargs["image_column"]
        records = check_images(records, self.transform.resolution, column, self.cache_dir, self.bucketing)
        self.skipped = check(records, self.source, self.on_bad_sample)
        self.summary = dataset_summary(self._relative_names(records), records.digests, records.captions)
        if self.skipped:
            log.warning(
                "skipping %d bad sample(s) in %s (data.on_bad_sample=skip)", len(self.skipped), self.source
            )
        self.records = records
        image_column = self.discover_kwargs["image_column"]
        if self.bucketing:
            sizes = read_image_sizes(records, image_column)
            resolution = self.transform.resolution
            self.buckets = assign_buckets(sizes, resolution, self.batch_size, self.bucket_max_aspect)
            log.info("aspect-ratio buckets (width, height): images %s", self.buckets.counts())
            self.dataset = BucketedDataset(
                records, self.buckets, self.transform.center_crop, self.transform.random_flip, image_column
            )
        else:
            self.dataset = ImageCaptionDataset(records, self.transform, image_column)

    @property
    def num_samples(self) -> int:
        return len(self.dataset) if self.dataset is not None else 0

    def condition_batch(self, count: int) -> dict[str, Any]:
        """The first `count` images, centre-cropped and unflipped, with their captions: what validation
        samples are conditioned on when a condition reads the training images (`conditioning.image_prompt.key:
        pixel_values`, image variations)."""
        self.setup()
        plain = ImageCaptionDataset(
            self.records, ImageTransform(self.transform.resolution), self.discover_kwargs["image_column"]
        )
        return collate([plain[i] for i in range(min(count, len(plain)))])

    def _relative_names(self, records: Records) -> list[str]:
        """Names independent of where the dataset lives: paths relative to the root, or row numbers."""
        if records.hf_dataset is not None:
            return [str(row) for row in records.images]
        root = Path(str(self.root)).expanduser().resolve()
        return [str(Path(path).relative_to(root)) for path in records.images]

    def prepare_with_model(self, stack: Any, conditioning: Any, accelerator: str) -> None:
        """Data made with the base model before training (DreamBooth class images); none here."""

    def train_dataloader(self) -> DataLoader:
        """Seeded order, same batch count every epoch, resumable mid-epoch (`sdtune.data.sampler`); with
        aspect-ratio buckets, every batch from one bucket."""
        seed = self.shuffle_seed if self.shuffle_seed is not None else torch.initial_seed()
        trainer = self.trainer
        replicas: dict[str, Any] = {
            "num_replicas": trainer.world_size if trainer is not None else 1,
            "rank": trainer.global_rank if trainer is not None else 0,
            "position": lambda: trainer_position(self.trainer),
        }
        sampler: DistributedSampler = (
            BucketSampler(self.buckets.ids, self.batch_size, seed=seed, **replicas)
            if self.buckets is not None
            else ResumableSampler(len(self.dataset), self.batch_size, seed, **replicas)
        )
        return ResumableDataLoader(
            self._training_dataset(),
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(seed),  # worker seeds without touching the global RNG
        )

    def _training_dataset(self) -> Dataset:
        """The dataset (cached or not), its captions shuffled or thinned when `data.shuffle_caption` or
        `data.caption_tag_dropout` asks for it."""
        if self.caption_tags is None:
            return self.dataset
        return AugmentedCaptions(self.dataset, self.caption_tags)

    def state_dict(self) -> dict[str, Any]:
        """Kept in checkpoints: the dataset fingerprint, compared on resume (`sdtune.resume`)."""
        summary = self.summary or {}
        return {"dataset": {k: summary.get(k) for k in ("fingerprint", "num_samples")}}


class ShapesDataModule(ImageCaptionDataModule):
    """The embedded synthetic shapes world, generated once into the cache (or into `root` if given)."""

    def __init__(
        self,
        num_images: int,
        seed: int,
        shapes: list[str] | None = None,
        colours: list[str] | None = None,
        backgrounds: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        from sdtune.data.shapes import BACKGROUNDS, COLOURS, SHAPES

        super().__init__(**kwargs)
        self.num_images = num_images
        self.seed = seed
        self.resolution = self.transform.resolution
        self.choices = (
            tuple(shapes or SHAPES),
            tuple(colours or COLOURS),
            tuple(backgrounds or BACKGROUNDS),
        )

    def prepare_data(self) -> None:
        self._ensure()

    def setup(self, stage: str | None = None) -> None:
        self._ensure()
        super().setup(stage)

    def _ensure(self) -> None:
        from sdtune.data.shapes import ensure_dataset

        if self.root is None:
            if self.cache_dir is None:
                raise ValueError("ShapesDataModule needs cache_dir (paths.cache_dir) when data.root is null")
            root = ensure_dataset(self.cache_dir, self.num_images, self.resolution, self.seed, *self.choices)
            self.root = str(root)
