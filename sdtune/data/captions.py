"""kohya's `--shuffle_caption`, `--keep_tokens` and `--caption_tag_dropout_rate` for tag captions
("sks, 1girl, red hair, smiling")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from sdtune.data.sampler import split_item

# Added to a sample's augmentation seed, so the caption order is drawn independently of its crop and flip.
_SEED_OFFSET = 0x5EED


@dataclass(frozen=True)
class TagAugment:
    """Drop each of a caption's tags (split at `separator`) with probability `tag_dropout` and, with
    `shuffle`, put the rest in a random order; the first `keep_tokens` tags always stay, in front (a trigger
    word, say). Tags are stripped, empty ones dropped, and joined with `separator` + a space."""

    keep_tokens: int = 0
    separator: str = ","
    shuffle: bool = True
    tag_dropout: float = 0.0

    def __call__(self, caption: str, generator: torch.Generator | None = None) -> str:
        tags = [tag.strip() for tag in caption.split(self.separator)]
        tags = [tag for tag in tags if tag]
        kept, rest = tags[: self.keep_tokens], tags[self.keep_tokens :]
        if self.tag_dropout:
            keep = torch.rand(len(rest), generator=generator) >= self.tag_dropout
            rest = [tag for tag, kept_tag in zip(rest, keep.tolist()) if kept_tag]
        if self.shuffle:
            rest = [rest[i] for i in torch.randperm(len(rest), generator=generator).tolist()]
        return f"{self.separator.strip()} ".join(kept + rest)


class AugmentedCaptions(Dataset):
    """`dataset` with each sample's `caption` shuffled (tags dropped); what is drawn follows the sample's seed
    from `ResumableSampler` / `BucketSampler`, so a resumed run reads the same captions."""

    def __init__(self, dataset: Dataset, augment: TagAugment) -> None:
        self.dataset = dataset
        self.augment = augment

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        sample = self.dataset[item]
        _, generator = split_item((item[0], item[1] + _SEED_OFFSET) if isinstance(item, tuple) else item)
        return {**sample, "caption": self.augment(sample["caption"], generator)}
