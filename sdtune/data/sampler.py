"""A seeded, resumable sampler: data order and augmentation depend only on (seed, epoch, position).

Each epoch is a permutation seeded with `seed + epoch`, split across ranks like `DistributedSampler`. Every
item carries its own augmentation seed, so random crops and flips do not touch the global RNG and come out the
same after a resume. Where an epoch starts is read from the trainer's progress when the iterator starts: a
resumed run continues mid-epoch exactly where the checkpoint left off.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, DistributedSampler

# (epoch, batches of this epoch already trained); None outside a Trainer.
Position = Callable[[], "tuple[int, int] | None"]


class ResumableSampler(DistributedSampler):
    """Yields `(index, augmentation_seed)` pairs; every epoch has the same number of full batches per rank.

    A `DistributedSampler` subclass so that Lightning neither replaces nor wraps it under DDP.
    """

    def __init__(
        self,
        dataset_size: int,
        batch_size: int,
        seed: int,
        *,
        shuffle: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
        position: Position | None = None,
    ) -> None:
        if dataset_size < 1:
            raise ValueError("ResumableSampler needs at least one sample")
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = position
        # Full batches only; a dataset smaller than one global batch is repeated to fill it.
        self.batches_per_epoch = max(1, dataset_size // (batch_size * num_replicas))
        self.num_samples = self.batches_per_epoch * batch_size  # per rank
        self.total_size = self.num_samples * num_replicas

    def __len__(self) -> int:
        return self.num_samples

    def start(self) -> tuple[int, int]:
        """(epoch, first batch) where the next iteration begins."""
        where = self.position() if self.position is not None else None
        epoch, done = where if where is not None else (self.epoch, 0)
        return epoch + done // self.batches_per_epoch, done % self.batches_per_epoch

    def epoch_order(self, epoch: int) -> list[int]:
        """The global sample order of `epoch` (length `total_size`)."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.dataset_size, generator=generator).tolist()
        else:
            order = list(range(self.dataset_size))
        return [order[i % self.dataset_size] for i in range(self.total_size)]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, first_batch = self.start()
        order = self.epoch_order(epoch)
        for slot in range(first_batch * self.batch_size, self.num_samples):
            position = slot * self.num_replicas + self.rank  # position in the epoch's global order
            yield order[position], augmentation_seed(self.seed, epoch, position)


def augmentation_seed(seed: int, epoch: int, position: int) -> int:
    """A seed for one item's random augmentation, distinct for every (seed, epoch, position)."""
    return ((seed * 1_000_003 + epoch) * 1_000_000_007 + position) & 0x7FFF_FFFF_FFFF_FFFF


def split_item(item: int | tuple[int, int]) -> tuple[int, torch.Generator | None]:
    """(index, augmentation generator) of a dataset item: an index, or a `ResumableSampler` pair."""
    if isinstance(item, tuple):
        index, seed = item
        return index, torch.Generator().manual_seed(seed)
    return item, None


class ResumableDataLoader(DataLoader):
    """A DataLoader over a `ResumableSampler`.

    Its position comes from the trainer's restored progress, so it has no state of its own to save; having
    `state_dict`/`load_state_dict` tells Lightning it resumes mid-epoch correctly.
    """

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass
