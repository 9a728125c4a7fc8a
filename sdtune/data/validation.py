"""Checking every image before training: readable, complete, a supported mode, large enough, not a duplicate.

Each image is read once, in a thread pool: its bytes are hashed (duplicates, the dataset fingerprint), then
decoded in full by Pillow (corrupt and truncated files fail here rather than at step 9,000). Verdicts on
image files are cached (`<cache_dir>/image-checks/`) by path, size and modification time: a second run, a
resume or the other DDP ranks check only what changed.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from sdtune.data.records import Records
from sdtune.io import atomic_write_json

# Modes that convert to 8-bit RGB without losing anything that training sees (alpha is composited on white).
CONVERTIBLE_MODES = ("RGB", "RGBA", "L", "LA", "P", "PA", "1")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PROGRESS_MIN_IMAGES = 256  # smaller sets are checked without a progress bar
CACHE_VERSION = 1  # bump when the checks change, to invalidate cached verdicts
CHUNK = 256  # images in flight at once (bounds memory for in-memory datasets)


@dataclass
class ImageCheck:
    """The verdict on one image: content digest, what is wrong with it (None if nothing), width and height."""

    digest: str | None
    problem: str | None
    size: tuple[int, int] | None = None


def check_image_bytes(data: bytes) -> ImageCheck:
    """Decode `data` fully and report the first problem that would stop or spoil training at any size."""
    digest = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()  # structure and checksums, without decoding
        with Image.open(io.BytesIO(data)) as image:
            mode, size = image.mode, image.size
            image.load()  # the pixels: truncated files fail here
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        return ImageCheck(digest, f"unreadable or truncated image ({_reason(error)})")
    return ImageCheck(digest, _mode_problem(mode, data), size)


def _reason(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    if text.startswith("cannot identify image file"):
        return "not a recognised image format, or a corrupt header"
    return text if len(text) < 120 else text[:117] + "..."


def _mode_problem(mode: str, data: bytes) -> str | None:
    if data.startswith(PNG_SIGNATURE) and len(data) > 24 and data[24] == 16:
        return (
            "16-bit PNG; sdtune trains on 8-bit RGB and does not reduce bit depth silently: convert it "
            "(e.g. `magick in.png -depth 8 out.png`)"
        )
    if mode == "CMYK":
        return (
            "CMYK image; its colours depend on a print profile: convert it to RGB with a colour-managed tool "
            "(e.g. `magick in.jpg -colorspace sRGB out.jpg`)"
        )
    if mode.startswith(("I", "F")):
        return f"{mode} image (16/32-bit or floating point); convert it to 8-bit RGB first"
    if mode not in CONVERTIBLE_MODES:
        return f"unsupported image mode {mode!r}; convert it to 8-bit RGB"
    return None


def _size_problem(size: tuple[int, int] | None, resolution: int | None, by_area: bool) -> str | None:
    """Too small to train at `resolution`: on its shorter side, or (aspect buckets) in pixel count."""
    if size is None or resolution is None:
        return None
    if by_area and size[0] * size[1] < resolution * resolution:
        return (
            f"image is {size[0]}x{size[1]}, fewer pixels than data.resolution={resolution} squared (its "
            "aspect bucket would upscale it); remove it or lower data.resolution"
        )
    if not by_area and min(size) < resolution:
        return (
            f"image is {size[0]}x{size[1]}, smaller than data.resolution={resolution} on its shorter side "
            "(it would be upscaled and blurry); remove it or lower data.resolution"
        )
    return None


def check_images(
    records: Records,
    resolution: int | None,
    image_column: str = "image",
    cache_dir: Path | None = None,
    by_area: bool = False,
) -> Records:
    """`records` minus every bad image; each removed one is added to `problems` with its reason.

    Also sets `digests` (content hash of each kept image) and marks later copies of an identical file as
    duplicates of the first. With `cache_dir`, verdicts on image files are reused while a file's size and
    modification time stay the same.
    """
    if cache_dir is not None and records.hf_dataset is None and len(records):
        checks = _cached_file_checks([Path(p) for p in records.images], Path(cache_dir))
    else:
        checks = _run_parallel(_loaders(records, image_column))
    kept = Records([], [], [], problems=list(records.problems), hf_dataset=records.hf_dataset)
    first_of: dict[str, str] = {}
    for i, result in enumerate(checks):
        name = records.names[i]
        problem = result.problem or _size_problem(result.size, resolution, by_area)
        if problem is None and result.digest in first_of:
            problem = f"duplicate of {first_of[result.digest]} (same bytes)"
        if problem is not None:
            kept.problems.append((name, problem))
            continue
        first_of[result.digest] = name
        kept.add(records.images[i], records.captions[i], name)
        kept.digests.append(result.digest)
    kept.problems.sort()
    return kept


def _loaders(records: Records, image_column: str) -> list[Callable[[], bytes]]:
    """One zero-argument function per record returning its encoded bytes (read in the worker thread)."""
    if records.hf_dataset is None:
        return [lambda path=path: Path(path).read_bytes() for path in records.images]
    return list(_hf_loaders(records, image_column))


def _hf_loaders(records: Records, image_column: str) -> Iterator[Callable[[], bytes]]:
    import datasets

    dataset = records.hf_dataset
    feature = dataset.features[image_column]
    if isinstance(feature, datasets.Image):
        raw = dataset.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
        for row in records.images:
            yield lambda row=row: _encoded(raw[row][image_column])
    else:  # already decoded objects (e.g. PIL images in memory): re-encode losslessly to check them
        for row in records.images:
            yield lambda row=row: _encode_png(dataset[row][image_column])


def _encoded(item: dict[str, Any]) -> bytes:
    if item.get("bytes"):
        return item["bytes"]
    return Path(item["path"]).read_bytes()


def _encode_png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _cached_file_checks(paths: list[Path], cache_dir: Path) -> list[ImageCheck]:
    """Checks of image files, reusing cached verdicts for files whose size and mtime have not changed.

    The cache file belongs to the folder that holds the images; one process at a time (e.g. among DDP ranks)
    checks and updates it, the others then find it complete.
    """
    folder = os.path.commonpath([str(p) for p in paths])
    cache = cache_dir / "image-checks" / f"{hashlib.sha256(folder.encode()).hexdigest()[:16]}.json"
    cache.parent.mkdir(parents=True, exist_ok=True)
    with open(cache.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        known = _read_cache(cache)
        stats = [_stat(path) for path in paths]
        entries = {}
        for path, stat in zip(paths, stats):
            entry = known.get(str(path))
            if stat is not None and entry is not None and entry.get("stat") == stat:
                entries[str(path)] = entry
        todo = [path for path in paths if str(path) not in entries]
        for path, result in zip(todo, _run_parallel([path.read_bytes for path in todo])):
            entries[str(path)] = {"digest": result.digest, "problem": result.problem, "size": result.size}
        checks = [_from_entry(entries[str(path)]) for path in paths]
        for path, stat in zip(paths, stats):
            entries[str(path)]["stat"] = stat
        cacheable = {k: v for k, v in entries.items() if v["stat"] is not None and v["digest"] is not None}
        atomic_write_json(cache, {"version": CACHE_VERSION, "folder": folder, "entries": cacheable})
    return checks


def _from_entry(entry: dict[str, Any]) -> ImageCheck:
    return ImageCheck(entry["digest"], entry["problem"], tuple(entry["size"]) if entry["size"] else None)


def _stat(path: Path) -> list[int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return cached.get("entries", {}) if cached.get("version") == CACHE_VERSION else {}


Loader = Callable[[], bytes]


def _run_parallel(loaders: list[Loader]) -> list[ImageCheck]:
    """`check_image_bytes` of each loader's bytes, in a thread pool, in order."""
    from tqdm.auto import tqdm

    def guarded(load: Loader) -> ImageCheck:
        try:
            return check_image_bytes(load())
        except OSError as error:  # unreadable file (permissions, I/O error)
            return ImageCheck(None, f"cannot read file ({_reason(error)})")

    results: list[ImageCheck] = []
    workers = min(32, (os.cpu_count() or 1) + 4)
    bar = tqdm(
        total=len(loaders),
        desc="checking images",
        unit="img",
        disable=True if len(loaders) < PROGRESS_MIN_IMAGES else None,
    )
    with ThreadPoolExecutor(max_workers=workers) as pool, bar:
        for start in range(0, len(loaders), CHUNK):
            for result in pool.map(guarded, loaders[start : start + CHUNK]):
                results.append(result)
                bar.update()
    return results
