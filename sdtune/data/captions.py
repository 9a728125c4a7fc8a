"""kohya's `--shuffle_caption` / `--keep_tokens` for tag captions ("sks, 1girl, red hair, smiling")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from sdtune.data.sampler import split_item

# Added to a sample's augmentation seed, so the caption order is drawn independently of its crop and flip.
_SEED_OFFSET = 0x5EED


@dataclass(frozen=True)
class CaptionShuffle:
    """Put a caption's tags (split at `separator`) in a random order, the first `keep_tokens` staying in front
    (a trigger word, say); tags are stripped, empty ones dropped, and joined with `separator` + a space."""

    keep_tokens: int = 0
    separator: str = ","

    def __call__(self, caption: str, generator: torch.Generator | None = None) -> str:
        tags = [tag.strip() for tag in caption.split(self.separator)]
        tags = [tag for tag in tags if tag]
        kept, rest = tags[: self.keep_tokens], tags[self.keep_tokens :]
        order = torch.randperm(len(rest), generator=generator).tolist()
        return f"{self.separator.strip()} ".join(kept + [rest[i] for i in order])


class ShuffledCaptions(Dataset):
    """`dataset` with each sample's `caption` shuffled; the order follows the sample's seed from
    `ResumableSampler` / `BucketSampler`, so a resumed run reads the same captions."""

    def __init__(self, dataset: Dataset, shuffle: CaptionShuffle) -> None:
        self.dataset = dataset
        self.shuffle = shuffle

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        sample = self.dataset[item]
        _, generator = split_item((item[0], item[1] + _SEED_OFFSET) if isinstance(item, tuple) else item)
        return {**sample, "caption": self.shuffle(sample["caption"], generator)}
