"""Image/caption discovery in each supported layout, and bad samples reported before training."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune.data.datamodule import ImageCaptionDataModule
from sdtune.data.records import DataError
from sdtune.data.transforms import ImageTransform


def write_image(
    path: Path, size: tuple[int, int] = (48, 32), colour: tuple[int, int, int] | None = None
) -> None:
    """A solid image; its colour depends on the file name unless given (identical files are duplicates)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if colour is None:
        digest = hashlib.sha256(path.name.encode()).digest()
        colour = (digest[0], digest[1], digest[2])
    Image.new("RGB", size, colour).save(path)


def datamodule(**kwargs) -> ImageCaptionDataModule:
    return ImageCaptionDataModule(name="captions", resolution=32, batch_size=2, **kwargs)


def test_metadata_jsonl_layout(tmp_path: Path) -> None:
    for i in range(3):
        write_image(tmp_path / "img" / f"{i}.png")
    lines = [json.dumps({"file_name": f"img/{i}.png", "text": f"caption {i}"}) for i in range(3)]
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines))
    dm = datamodule(root=str(tmp_path))
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert set(dm.dataset.records.captions) == {"caption 0", "caption 1", "caption 2"}


def test_sidecar_captions_and_every_bad_sample_listed(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red thing")
    write_image(tmp_path / "b.jpg")  # no caption
    write_image(tmp_path / "c.png")
    (tmp_path / "c.txt").write_text("   ")  # empty caption
    write_image(tmp_path / "d.png")
    (tmp_path / "d.txt").write_bytes(b"\xff\xfe bad")  # not UTF-8
    with pytest.raises(DataError) as info:
        datamodule(root=str(tmp_path)).setup()
    message = str(info.value)
    assert "3 bad sample(s)" in message
    for name in ("b.jpg", "c.txt", "d.txt"):
        assert name in message
    assert "on_bad_sample=skip" in message

    dm = datamodule(root=str(tmp_path), on_bad_sample="skip")
    dm.setup()
    assert dm.num_samples == 1 and len(dm.skipped) == 3


def test_metadata_path_outside_root_is_a_named_bad_sample(tmp_path: Path) -> None:
    write_image(tmp_path / "outside.png")
    root = tmp_path / "data"
    write_image(root / "in.png")
    lines = [{"file_name": "in.png", "text": "ok"}, {"file_name": "../outside.png", "text": "escape"}]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    with pytest.raises(DataError, match=r"\.\./outside\.png.*outside the data root"):
        datamodule(root=str(root)).setup()


def test_metadata_lines_that_are_not_entries_are_named_bad_samples(tmp_path: Path) -> None:
    write_image(tmp_path / "in.png")
    lines = [json.dumps({"file_name": "in.png", "text": "ok"}), '["in.png", "a list"]', "{not json"]
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines))
    with pytest.raises(DataError) as info:
        datamodule(root=str(tmp_path)).setup()
    message = str(info.value)
    assert "2 bad sample(s)" in message
    assert "metadata.jsonl:2" in message and "no 'file_name'" in message
    assert "metadata.jsonl:3" in message and "not valid JSON" in message


def test_empty_dataset_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no usable"):
        datamodule(root=str(tmp_path)).setup()


def test_hf_dataset_saved_to_disk(tmp_path: Path) -> None:
    import datasets

    images = [Image.new("RGB", (40, 40), (i * 50, 0, 0)) for i in range(4)]
    ds = datasets.Dataset.from_dict({"img": images, "caption": [f"c{i}" for i in range(4)]})
    ds = ds.cast_column("img", datasets.Image())
    ds.save_to_disk(str(tmp_path / "hf"))
    dm = datamodule(hf_name=str(tmp_path / "hf"), image_column="img", caption_column="caption")
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    with pytest.raises(DataError, match="data.image_column"):
        datamodule(hf_name=str(tmp_path / "hf")).setup()


def test_transform_resizes_crops_and_normalises() -> None:
    image = Image.fromarray(
        np.concatenate([np.zeros((32, 32, 3)), np.full((32, 32, 3), 255)], 1).astype("uint8")
    )
    centre = ImageTransform(16, center_crop=True)(image)
    assert centre.shape == (3, 16, 16)
    assert centre.min() == -1 and centre.max() == 1  # the centre crop straddles black and white
    torch.manual_seed(0)
    flips = {bool(ImageTransform(16, random_flip=True)(image)[0, 0, 0] > 0) for _ in range(20)}
    assert flips == {True, False}
