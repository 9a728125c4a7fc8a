"""Images with aligned semantic label maps (class index per pixel), and optional captions.

Layouts under `data.root`:
- `metadata.jsonl` with `file_name`, a map column (`map`) and optionally a caption column (`text`); the
  shapes world writes exactly this;
- `images/` and `maps/` with the same file stems (`images/0001.jpg` ↔ `maps/0001.png`), optional caption
  sidecars `images/0001.txt`.

A map is a single-channel PNG of class ids (mode L, P or I), or an RGB PNG whose colours `data.palette` (a
JSON list of [r, g, b], index = class id) names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sdtune.data.conditioned import ConditionedDataModule, RecordDataset, oriented_size
from sdtune.data.joint import JointTransform
from sdtune.data.records import IMAGE_SUFFIXES, DataError, Records, metadata_entries

MAP_SUFFIXES = (".png", ".bmp", ".tif", ".tiff")
SINGLE_CHANNEL_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L")


class MapError(DataError):
    """A label map (or palette) that cannot be read as class ids; the message says why."""


@dataclass
class MapRecords(Records):
    """Records whose samples each have a label map."""

    maps: list[Path] = field(default_factory=list)


def load_palette(path: str | Path) -> np.ndarray:
    """(num_classes, 3) uint8 colours from a JSON list of [r, g, b] (index = class id)."""
    try:
        colours = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
        palette = np.asarray(colours, dtype=np.int64)
    except (OSError, ValueError) as error:
        raise MapError(f"data.palette {path}: not a readable JSON list of [r, g, b] ({error})") from error
    if palette.ndim != 2 or palette.shape[1] != 3 or palette.min() < 0 or palette.max() > 255:
        raise MapError(f"data.palette {path}: expected a JSON list of [r, g, b] triples with values 0-255")
    return palette.astype(np.uint8)


def read_label_map(path: Path, palette: np.ndarray | None = None) -> np.ndarray:
    """The (H, W) int64 class ids of a label map file (see the module docstring for the formats)."""
    try:
        with Image.open(path) as image:
            image.load()
    except OSError as error:
        raise MapError(f"not a readable image ({error})") from error
    if palette is not None:
        return _ids_from_colours(np.asarray(image.convert("RGB")), palette)
    if image.mode not in SINGLE_CHANNEL_MODES:
        raise MapError(
            f"map has mode {image.mode}; give class ids in a single-channel PNG, or set data.palette to a "
            "JSON list of [r, g, b] colours (index = class id) for RGB maps"
        )
    return np.asarray(image).astype(np.int64)


def _ids_from_colours(rgb: np.ndarray, palette: np.ndarray) -> np.ndarray:
    codes = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    palette_codes = (
        (palette[:, 0].astype(np.int64) << 16) | (palette[:, 1].astype(np.int64) << 8) | palette[:, 2]
    )
    lookup = {int(code): i for i, code in reversed(list(enumerate(palette_codes)))}
    unique, inverse = np.unique(codes, return_inverse=True)
    unknown = [int(c) for c in unique if int(c) not in lookup]
    if unknown:
        colour = ((unknown[0] >> 16) & 255, (unknown[0] >> 8) & 255, unknown[0] & 255)
        raise MapError(f"colour {colour} is not in data.palette ({len(unknown)} unknown colour(s))")
    return np.asarray([lookup[int(c)] for c in unique], dtype=np.int64)[inverse].reshape(codes.shape)


def label_problem(labels: np.ndarray, num_classes: int, ignore_index: int) -> str | None:
    """Why `labels` is unusable (a class id outside [0, num_classes) other than ignore_index), or None."""
    bad = labels[((labels < 0) | (labels >= num_classes)) & (labels != ignore_index)]
    if bad.size == 0:
        return None
    ids = sorted({int(v) for v in np.unique(bad)})
    return (
        f"class id(s) {ids[:5]} outside 0..{num_classes - 1} (data.num_classes={num_classes}, "
        f"data.ignore_index={ignore_index}); raise data.num_classes or fix the map"
    )


def find_map_records(
    folder: Path,
    *,
    image_dir: str,
    map_dir: str,
    map_column: str,
    caption_column: str,
    caption_extension: str,
) -> MapRecords:
    """Image/map/caption triples under `folder`, without reading any map (see the module docstring)."""
    records = MapRecords([], [], [])
    if (folder / "metadata.jsonl").exists():
        for where, entry in metadata_entries(folder / "metadata.jsonl", records):
            image, map_path = entry.get("file_name"), entry.get(map_column)
            if not isinstance(image, str) or not isinstance(map_path, str):
                records.problems.append((where, f"needs 'file_name' and '{map_column}' (the label map)"))
                continue
            caption = entry.get(caption_column)
            _add(
                records,
                folder,
                folder / image,
                folder / map_path,
                caption if isinstance(caption, str) else "",
            )
        return records
    images = sorted(p for p in (folder / image_dir).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:  # nothing to skip to: not a bad sample but the wrong folder
        raise DataError(
            f"data.root {folder}: no metadata.jsonl and no images under {image_dir}/ (data.image_dir); "
            f"give a folder with images in {image_dir}/ and label maps in {map_dir}/, or a metadata.jsonl"
        )
    for image in images:
        stem = (folder / map_dir / image.relative_to(folder / image_dir)).with_suffix("")
        maps = [stem.with_suffix(s) for s in MAP_SUFFIXES if stem.with_suffix(s).is_file()]
        sidecar = image.with_suffix(caption_extension)
        caption = sidecar.read_text(encoding="utf-8", errors="replace").strip() if sidecar.is_file() else ""
        _add(records, folder, image, maps[0] if maps else stem.with_suffix(".png"), caption)
    return records


def _add(records: MapRecords, folder: Path, image: Path, map_path: Path, caption: str) -> None:
    image, map_path = image.resolve(), map_path.resolve()
    if not (image.is_relative_to(folder) and map_path.is_relative_to(folder)):
        records.problems.append((str(image), "path points outside the data root"))
    elif not image.is_file():
        records.problems.append((str(image), "image does not exist"))
    elif not map_path.is_file():
        records.problems.append((str(image), f"no label map: {map_path} does not exist"))
    else:
        records.add(image, caption.strip(), str(image))
        records.maps.append(map_path)


def checked_map_records(
    records: MapRecords, num_classes: int, ignore_index: int, palette: np.ndarray | None
) -> MapRecords:
    """The records whose map reads, matches its image's size and holds only valid class ids; the others are
    added to `problems`, each naming the map file."""
    good = MapRecords([], [], [], problems=list(records.problems))
    for image, caption, name, map_path in zip(records.images, records.captions, records.names, records.maps):
        try:
            labels = read_label_map(map_path, palette)
            image_size = oriented_size(image)
        except (MapError, OSError) as error:
            good.problems.append((str(map_path), str(error)))
            continue
        problem = label_problem(labels, num_classes, ignore_index)
        if (labels.shape[1], labels.shape[0]) != image_size:
            problem = (
                f"map is {labels.shape[1]}x{labels.shape[0]} but its image {image.name} is "
                f"{image_size[0]}x{image_size[1]}; a map must have its image's size"
            )
        if problem:
            good.problems.append((str(map_path), problem))
            continue
        good.add(image, caption, name)
        good.maps.append(map_path)
    return good


class SemanticMapDataset(RecordDataset):
    """Pixels in [-1, 1], the (H, W) class-id map (same crop and flip) and the caption of each record."""

    def __init__(self, records: MapRecords, transform: JointTransform, palette: np.ndarray | None) -> None:
        self.records = records
        self.transform = transform
        self.palette = palette

    def item(
        self, index: int, augment: bool = True, generator: torch.Generator | None = None
    ) -> dict[str, Any]:
        with Image.open(self.records.images[index]) as opened:
            image = opened.copy()
        labels = read_label_map(self.records.maps[index], self.palette)
        pixels, aligned = self.transform(image, labels={"map": labels}, augment=augment, generator=generator)
        return {"pixel_values": pixels, "map": aligned["map"], "caption": self.records.captions[index]}


class SemanticMapDataModule(ConditionedDataModule):
    """Images with label maps from `root`; the embedded shapes world (maps included) when it is null."""

    batch_keys = ("pixel_values", "caption", "map")

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        palette: str | None = None,
        image_dir: str = "images",
        map_dir: str = "maps",
        map_column: str = "map",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.palette_path = palette
        self.layout = {"image_dir": image_dir, "map_dir": map_dir, "map_column": map_column}

    def generate_root(self) -> Path:
        from sdtune.data.shapes import ensure_dataset

        return ensure_dataset(self.cache_dir, self.num_images, self.transform.resolution, self.seed)

    def find_records(self) -> MapRecords:
        palette = load_palette(self.palette_path) if self.palette_path else None
        records = find_map_records(
            Path(self.root).expanduser().resolve(),
            caption_column=self.discover_kwargs["caption_column"],
            caption_extension=self.discover_kwargs["caption_extension"],
            **self.layout,
        )
        return checked_map_records(records, self.num_classes, self.ignore_index, palette)

    def make_dataset(self, records: MapRecords) -> SemanticMapDataset:
        palette = load_palette(self.palette_path) if self.palette_path else None
        return SemanticMapDataset(records, self.joint, palette)
