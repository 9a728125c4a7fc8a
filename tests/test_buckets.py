"""Aspect-ratio bucketing: bucket shapes, single-bucket batches, disjoint DDP shares, exact resume."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from sdtune.data.buckets import BucketSampler, assign_buckets, bucket_sizes, fit_image
from sdtune.data.datamodule import ImageCaptionDataModule, collate
from sdtune.data.transforms import ImageTransform

from .test_cache import write_folder


@pytest.mark.parametrize("resolution, step", [(64, 8), (512, 64), (1024, 64)])
def test_buckets_have_about_the_same_pixels(resolution: int, step: int) -> None:
    sizes = bucket_sizes(resolution)
    assert (resolution, resolution) in sizes
    for width, height in sizes:
        assert width % step == 0 and height % step == 0
        assert 0.75 * resolution**2 <= width * height <= resolution**2
        assert max(width / height, height / width) <= 2.0
    assert any(w > h for w, h in sizes) and any(h > w for w, h in sizes)


def test_images_go_to_the_nearest_aspect_and_small_buckets_merge() -> None:
    images = [(1000, 500)] * 4 + [(500, 1000)] * 4 + [(800, 800)] * 4 + [(700, 800)]
    buckets = assign_buckets(images, 64, batch_size=4)
    wide, tall, square = (buckets.size_of(i) for i in (0, 4, 8))
    assert wide[0] > wide[1] and tall[1] > tall[0] and square == (64, 64)
    assert buckets.size_of(12) == square  # alone in its own bucket, folded into the nearest (square) one
    assert set(buckets.counts().values()) == {4, 5}


def test_fit_image_on_a_square_is_the_plain_transform() -> None:
    generator = torch.Generator().manual_seed(0)
    image = Image.fromarray(
        torch.randint(0, 256, (50, 77, 3), generator=generator, dtype=torch.uint8).numpy()
    )
    assert torch.equal(fit_image(image, (32, 32)), ImageTransform(32)(image))
    assert fit_image(image, (48, 24)).shape == (3, 24, 48)


def bucket_ids(counts: list[int]) -> list[int]:
    ids = [b for b, n in enumerate(counts) for _ in range(n)]
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(1)).tolist()
    return [ids[i] for i in order]  # buckets interleaved in index order


def test_every_batch_is_one_bucket_and_each_sample_once_per_epoch_across_two_ranks() -> None:
    ids, batch = bucket_ids([8, 4, 12]), 4  # 6 batches: 3 per rank
    ranks = [BucketSampler(ids, batch, seed=5, num_replicas=2, rank=r) for r in range(2)]
    for epoch in range(2):
        seen = []
        for sampler in ranks:
            sampler.set_epoch(epoch)
            indices = list(sampler)
            assert len(indices) == len(sampler) == 12
            batches = [indices[i : i + batch] for i in range(0, len(indices), batch)]
            assert all(len({ids[i] for i in b}) == 1 for b in batches)
            seen += indices
        assert sorted(seen) == list(range(len(ids)))  # disjoint shares, every sample exactly once
    assert list(ranks[0]) != (ranks[0].set_epoch(0) or list(ranks[0]))  # a new order each epoch


def test_uneven_buckets_pad_with_their_own_samples() -> None:
    ids, batch = bucket_ids([5, 3]), 4
    samplers = [BucketSampler(ids, batch, num_replicas=2, rank=r) for r in range(2)]
    indices = [i for s in samplers for i in s]
    assert set(indices) == set(range(8)) and len(indices) == 16  # 2 + 1 batches, padded to 4: 2 per rank
    for s in samplers:
        got = list(s)
        assert all(len({ids[i] for i in got[k : k + batch]}) == 1 for k in range(0, len(got), batch))


def test_resume_continues_the_same_order() -> None:
    ids, batch = bucket_ids([8, 4, 12]), 4
    reference = BucketSampler(ids, batch, seed=9)
    expected = []
    for epoch in range(2):
        reference.set_epoch(epoch)
        expected += list(reference)

    first = BucketSampler(ids, batch, seed=9)
    iterator = iter(first)
    got = [next(iterator) for _ in range(2 * batch)]  # two batches, then "interrupted"
    state = first.state_dict()
    resumed = BucketSampler(ids, batch, seed=0)
    resumed.load_state_dict(state)
    got += list(resumed)
    resumed.set_epoch(1)
    got += list(resumed)
    assert got == expected

    # Inside a Trainer the position comes from its (checkpointed) progress: epoch 1, 4 batches done.
    from_progress = BucketSampler(ids, batch, seed=9, position=lambda: (1, 4))
    assert list(from_progress) == expected[len(ids) + 4 * batch :]


def test_bucketed_datamodule_batches(tmp_path) -> None:
    sizes = [(96, 48)] * 4 + [(48, 96)] * 4 + [(64, 64)] * 4
    root = write_folder(tmp_path / "data", [f"image {i}" for i in range(12)], sizes)
    dm = ImageCaptionDataModule(
        name="captions", root=str(root), resolution=64, batch_size=4, bucketing=True, random_flip=True
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    shapes = sorted(tuple(b["pixel_values"].shape[2:]) for b in loader)
    assert len(shapes) == 3 and len(set(shapes)) == 3  # one batch per bucket
    for height, width in shapes:
        assert math.isclose(height * width, 64 * 64, rel_tol=0.25)
    assert isinstance(loader.sampler, BucketSampler) and loader.collate_fn is collate
