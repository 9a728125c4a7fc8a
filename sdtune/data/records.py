"""Finding image/caption pairs in the layouts users have, and reporting every bad one before training."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class DataError(ValueError):
    """The dataset has problems; the message lists each bad sample with its reason and what to do."""


@dataclass
class Records:
    """Image references (file paths, or row indices of a Hugging Face dataset) with their captions."""

    images: list[Any]
    captions: list[str]
    names: list[str]
    problems: list[tuple[str, str]] = field(default_factory=list)  # (sample, reason)
    hf_dataset: Any = None
    digests: list[str] = field(default_factory=list)  # content hash of each image, once checked

    def __len__(self) -> int:
        return len(self.images)

    def add(self, image: Any, caption: str, name: str) -> None:
        self.images.append(image)
        self.captions.append(caption)
        self.names.append(name)


def discover(
    root: str | None,
    hf_name: str | None,
    *,
    hf_split: str = "train",
    image_column: str = "image",
    caption_column: str = "text",
    caption_extension: str = ".txt",
) -> Records:
    """Records from a Hugging Face dataset (hub name or local path), or from an image folder.

    Folder layouts: `metadata.jsonl` with `file_name` and a caption column (Hugging Face `imagefolder`),
    a dataset saved with `save_to_disk`, or kohya-style sidecar captions (`img.png` + `img.txt`).
    """
    if hf_name is not None:
        return _from_hf(_load_hf(hf_name, hf_split), image_column, caption_column, hf_name)
    folder = Path(root).expanduser().resolve()
    if (folder / "dataset_info.json").exists() or (folder / "state.json").exists():
        return _from_hf(_load_hf(str(folder), hf_split), image_column, caption_column, str(folder))
    if (folder / "metadata.jsonl").exists():
        return _from_metadata(folder, caption_column)
    return _from_sidecars(folder, caption_extension)


def _load_hf(name: str, split: str) -> Any:
    import datasets

    path = Path(name).expanduser()
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists()):
        loaded = datasets.load_from_disk(str(path))
        return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    return datasets.load_dataset(name, split=split)


def _from_hf(dataset: Any, image_column: str, caption_column: str, source: str) -> Records:
    missing = [c for c in (image_column, caption_column) if c not in dataset.column_names]
    if missing:
        raise DataError(
            f"dataset {source}: column(s) {missing} not found; it has {dataset.column_names}. "
            "Set data.image_column / data.caption_column."
        )
    records = Records([], [], [], hf_dataset=dataset)
    for i, caption in enumerate(dataset[caption_column]):
        name = f"{source}[{i}]"
        if not isinstance(caption, str) or not caption.strip():
            records.problems.append((name, "missing or empty caption"))
            continue
        records.add(i, caption.strip(), name)
    return records


def metadata_entries(path: Path, records: Records) -> list[tuple[str, dict[str, Any]]]:
    """(where, entry) for each JSON line of a metadata.jsonl; unparsable lines go to `records.problems`."""
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            records.problems.append((where, f"not valid JSON ({error.msg})"))
            continue
        entries.append((where, entry if isinstance(entry, dict) else {}))
    return entries


def _from_metadata(folder: Path, caption_column: str) -> Records:
    records = Records([], [], [])
    for where, entry in metadata_entries(folder / "metadata.jsonl", records):
        file_name, caption = entry.get("file_name"), entry.get(caption_column)
        if not isinstance(file_name, str):
            records.problems.append((where, "no 'file_name'"))
            continue
        path = (folder / file_name).resolve()
        if not path.is_relative_to(folder):
            records.problems.append((f"{where} ({file_name})", "path points outside the data root"))
        elif not path.is_file():
            records.problems.append((str(path), f"image listed in {where} does not exist"))
        elif not isinstance(caption, str) or not caption.strip():
            records.problems.append((str(path), f"missing or empty caption '{caption_column}' in {where}"))
        else:
            records.add(path, caption.strip(), str(path))
    return records


def _from_sidecars(folder: Path, caption_extension: str) -> Records:
    records = Records([], [], [])
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    for path in images:
        caption_file = path.with_suffix(caption_extension)
        if not caption_file.is_file():
            records.problems.append((str(path), f"no caption file {caption_file.name}"))
            continue
        try:
            caption = caption_file.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError:
            records.problems.append((str(caption_file), "caption file is not UTF-8 text"))
            continue
        if not caption:
            records.problems.append((str(caption_file), "caption file is empty"))
            continue
        records.add(path, caption, str(path))
    return records


def check(records: Records, source: str, on_bad_sample: str) -> list[tuple[str, str]]:
    """Raise DataError listing every bad sample (`error`), or return them for logging (`skip`)."""
    if records.problems and on_bad_sample == "error":
        listed = "\n".join(f"  - {name}: {reason}" for name, reason in records.problems)
        raise DataError(
            f"{len(records.problems)} bad sample(s) in {source}:\n{listed}\n"
            "Fix them, or set data.on_bad_sample=skip to train on the rest."
        )
    if len(records) == 0:
        raise DataError(
            f"no usable samples in {source}; check data.root and its layout (README: Train, Conditioning)"
        )
    return records.problems
