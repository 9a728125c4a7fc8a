"""Every image is checked before any model loads: unreadable, truncated, odd modes, too small, duplicates."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdtune.data.datamodule import ImageCaptionDataModule
from sdtune.data.records import DataError
from sdtune.data.transforms import to_rgb
from sdtune.data.validation import check_image_bytes

BAD = {  # file -> what the error must say about it
    "corrupt.png": "unreadable",
    "truncated.jpg": "truncated",
    "cmyk.jpg": "CMYK",
    "deep.png": "16-bit",
    "uncaptioned.png": "no caption file",
}


def noise(size: tuple[int, int], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def save(image: Image.Image, path: Path, caption: str | None = "a test image", **kwargs) -> None:
    image.save(path, **kwargs)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory) -> Path:
    """Five good images (RGB, greyscale, a palette with transparency) and the five bad ones of `BAD`."""
    root = tmp_path_factory.mktemp("bad-data")
    for i in range(3):
        save(Image.fromarray(noise((40, 36), i)), root / f"good{i}.png", f"good image {i}")
    save(Image.fromarray(noise((40, 36), 3)).convert("L"), root / "grey.png")
    palette = Image.fromarray(noise((36, 36), 4)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    save(palette, root / "palette.png", transparency=0)
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    (root / "corrupt.txt").write_text("corrupt")
    buffer = io.BytesIO()
    Image.fromarray(noise((64, 64), 5)).save(buffer, format="JPEG", quality=95)
    (root / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (root / "truncated.txt").write_text("truncated")
    save(Image.fromarray(noise((40, 40), 6)).convert("CMYK"), root / "cmyk.jpg")
    save(Image.fromarray(noise((40, 40), 7)[..., 0].astype(np.uint16) * 257), root / "deep.png")
    save(Image.fromarray(noise((40, 40), 8)), root / "uncaptioned.png", caption=None)
    return root


def datamodule(root: Path, **kwargs) -> ImageCaptionDataModule:
    return ImageCaptionDataModule(name="captions", resolution=32, batch_size=2, root=str(root), **kwargs)


def test_error_lists_exactly_the_bad_files(bad_folder: Path) -> None:
    with pytest.raises(DataError) as info:
        datamodule(bad_folder).setup()
    message = str(info.value)
    assert message.startswith(f"{len(BAD)} bad sample(s)")
    listed = [line for line in message.splitlines() if line.startswith("  - ")]
    assert len(listed) == len(BAD)
    for name, reason in BAD.items():
        (line,) = [entry for entry in listed if f"/{name}:" in entry]
        assert reason in line, line
    assert "on_bad_sample=skip" in message


def test_skip_keeps_the_good_ones_and_converts_losslessly(bad_folder: Path) -> None:
    dm = datamodule(bad_folder, on_bad_sample="skip")
    dm.setup()
    assert sorted(Path(p).name for p in dm.dataset.records.images) == [
        "good0.png",
        "good1.png",
        "good2.png",
        "grey.png",
        "palette.png",
    ]
    assert len(dm.skipped) == len(BAD)
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert dm.summary["num_samples"] == 5 and len(dm.summary["fingerprint"]) == 16


def test_small_images_and_duplicates_are_bad_samples(tmp_path: Path) -> None:
    save(Image.fromarray(noise((40, 40), 0)), tmp_path / "a.png")
    (tmp_path / "copy.png").write_bytes((tmp_path / "a.png").read_bytes())
    (tmp_path / "copy.txt").write_text("the same picture")
    save(Image.fromarray(noise((40, 20), 1)), tmp_path / "small.png")
    with pytest.raises(DataError) as info:
        datamodule(tmp_path).setup()
    message = str(info.value)
    assert "copy.png: duplicate of" in message and "a.png (same bytes)" in message
    assert "small.png: image is 40x20, smaller than data.resolution=32" in message


def test_hf_dataset_images_are_checked(tmp_path: Path) -> None:
    import datasets

    good = [Image.fromarray(noise((40, 40), i)) for i in range(3)]
    ds = datasets.Dataset.from_dict({"image": good + [good[0]], "text": ["a", "b", "c", "d"]})
    ds.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "hf"))
    dm = ImageCaptionDataModule(
        name="captions", resolution=32, batch_size=2, hf_name=str(tmp_path / "hf"), on_bad_sample="skip"
    )
    dm.setup()
    assert dm.num_samples == 3
    assert dm.skipped == [(f"{tmp_path / 'hf'}[3]", f"duplicate of {tmp_path / 'hf'}[0] (same bytes)")]


def test_transparency_is_composited_on_white() -> None:
    rgba = Image.new("RGBA", (2, 1), (255, 0, 0, 0))
    rgba.putpixel((1, 0), (0, 0, 255, 255))
    assert list(to_rgb(rgba).getdata()) == [(255, 255, 255), (0, 0, 255)]
    grey = Image.new("L", (1, 1), 77)
    assert list(to_rgb(grey).getdata()) == [(77, 77, 77)]


def test_unsupported_modes_are_named() -> None:
    def encoded(image: Image.Image, fmt: str = "TIFF") -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt)
        return buffer.getvalue()

    assert "floating point" in check_image_bytes(encoded(Image.new("F", (40, 40)))).problem
    assert check_image_bytes(encoded(Image.new("RGB", (40, 30)), "PNG")).size == (40, 30)
    assert "unreadable" in check_image_bytes(b"not an image").problem


def test_verdicts_are_cached_until_a_file_changes(tmp_path: Path, monkeypatch) -> None:
    from sdtune.data import validation

    root, cache = tmp_path / "data", tmp_path / "cache"
    root.mkdir()
    for i in range(3):
        save(Image.fromarray(noise((40, 40), i)), root / f"{i}.png")
    datamodule(root, cache_dir=str(cache)).setup()
    checked = []
    check = validation.check_image_bytes
    monkeypatch.setattr(validation, "check_image_bytes", lambda data: checked.append(data) or check(data))
    assert datamodule(root, cache_dir=str(cache)).setup() is None and checked == []
    Image.fromarray(noise((40, 20), 9)).save(root / "1.png")  # replaced by a smaller picture
    with pytest.raises(DataError, match="1.png: image is 40x20"):
        datamodule(root, cache_dir=str(cache)).setup()
    assert len(checked) == 1


def test_skip_trains_on_the_rest_and_records_the_list(bad_folder: Path, train_cfg) -> None:
    from sdtune.train import train

    cfg = train_cfg(
        "+experiment=lora",
        "data=captions",
        f"data.root={bad_folder}",
        "data.resolution=32",
        "data.batch_size=2",
        "data.num_workers=0",
        "data.on_bad_sample=skip",
        "trainer.max_steps=1",
        "sampling.prompts=[]",
        "logger=none",
    )
    run = train(cfg)
    skipped = json.loads((run.run_dir / "skipped_samples.json").read_text())
    assert sorted(Path(entry["sample"]).name for entry in skipped) == sorted(BAD)
    manifest = json.loads((run.run_dir / "manifest.json").read_text())
    assert manifest["skipped_samples"] == len(BAD) and manifest["num_train_images"] == 5
    assert manifest["global_step"] == 1
    dataset = json.loads((run.run_dir / "dataset.json").read_text())
    assert dataset["num_samples"] == 5 and "grey.png" in dataset["samples"]
    assert manifest["dataset_fingerprint"] == dataset["fingerprint"]
