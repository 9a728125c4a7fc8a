"""DreamBooth class images: exactly the missing ones are generated, reused, resumed, split across ranks."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdtune.data.class_images import ensure_class_images, list_images, missing_indices
from sdtune.data.records import DataError


class FakeRenderer:
    """Renders index i as a flat image of grey level i; records every call; can fail after N batches."""

    def __init__(self, fail_after_batches: int | None = None) -> None:
        self.calls: list[list[int]] = []
        self.fail_after_batches = fail_after_batches

    def __call__(self, indices: list[int]) -> list[Image.Image]:
        if self.fail_after_batches is not None and len(self.calls) == self.fail_after_batches:
            raise KeyboardInterrupt("interrupted")
        self.calls.append(list(indices))
        return [Image.new("RGB", (8, 8), (i, i, i)) for i in indices]

    @property
    def rendered(self) -> list[int]:
        return [i for call in self.calls for i in call]


def grey_level(path: Path) -> int:
    return int(np.asarray(Image.open(path))[0, 0, 0])


def test_generates_exactly_the_missing_images_then_reuses_them(tmp_path: Path) -> None:
    render = FakeRenderer()
    paths = ensure_class_images(tmp_path, 7, render, batch_size=3)
    assert render.calls == [[0, 1, 2], [3, 4, 5], [6]]  # batched
    assert [p.name for p in paths] == [f"class_{i:05d}.png" for i in range(7)]
    assert [grey_level(p) for p in paths] == list(range(7))  # image i is render(i)

    again = FakeRenderer()
    assert ensure_class_images(tmp_path, 7, again, batch_size=3) == paths
    assert again.calls == []  # a second run reuses the folder
    more = FakeRenderer()
    assert len(ensure_class_images(tmp_path, 9, more, batch_size=3)) == 9
    assert more.rendered == [7, 8]  # a larger num_class_images only adds the difference


def test_existing_images_count_and_only_the_rest_is_generated(tmp_path: Path) -> None:
    for name in ("mine_a.jpg", "mine_b.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    Image.new("RGB", (8, 8)).save(tmp_path / "class_00001.png")  # e.g. kept from an earlier run
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".class_00000.png.tmp-123").write_bytes(b"half-written by a killed process")
    render = FakeRenderer()
    paths = ensure_class_images(tmp_path, 6, render, batch_size=4)
    assert render.rendered == [0, 2, 3]  # 3 present → 3 missing, at the lowest free indices
    assert len(paths) == 6 and len(list_images(tmp_path)) == 6


def test_an_interrupted_generation_resumes_where_it_stopped(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        ensure_class_images(tmp_path, 10, FakeRenderer(fail_after_batches=2), batch_size=3)
    assert [p.name for p in list_images(tmp_path)] == [f"class_{i:05d}.png" for i in range(6)]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no half-written file left

    resumed = FakeRenderer()
    paths = ensure_class_images(tmp_path, 10, resumed, batch_size=3)
    assert resumed.rendered == [6, 7, 8, 9]
    assert [grey_level(p) for p in paths] == list(range(10))  # same images as one uninterrupted run


def test_ranks_generate_disjoint_shares_and_wait_for_each_other(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "class_00004.png")
    renders = {rank: FakeRenderer() for rank in range(3)}
    results: dict[int, list[Path]] = {}

    def run(rank: int) -> None:
        results[rank] = ensure_class_images(tmp_path, 9, renders[rank], 2, rank=rank, world_size=3)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(results) == [0, 1, 2], "a rank did not finish"
    for rank, render in renders.items():
        assert all(i % 3 == rank for i in render.rendered)
    everything = sorted(i for render in renders.values() for i in render.rendered)
    assert everything == [0, 1, 2, 3, 5, 6, 7, 8]  # each missing image generated exactly once
    assert results[0] == results[1] == results[2] and len(results[0]) == 9


def test_a_rank_whose_peers_never_finish_times_out_clearly(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="holds 2 of 4 images"):
        ensure_class_images(tmp_path, 4, FakeRenderer(), 2, rank=0, world_size=2, timeout_s=0.5)


def test_missing_indices() -> None:
    assert missing_indices(Path("/nonexistent"), 3) == [0, 1, 2]
