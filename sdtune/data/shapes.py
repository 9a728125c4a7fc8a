"""Embedded synthetic "shapes world" dataset: one coloured shape on a plain background per image.

Each sample is an RGB image, a caption such as ``"a red circle on a gray background"`` and a
semantic map (uint8, class id ``SHAPES.index(shape) + 1`` on the shape, ``0`` elsewhere). Datasets
are written in the Hugging Face ``imagefolder`` layout::

    root/images/00000.png     RGB image
    root/maps/00000.png       mode "L" semantic map
    root/metadata.jsonl       {"file_name", "text", "map", "shape", "colour", "background"} per line
    root/classes.json         ["background", *SHAPES]

Generation is deterministic (image ``i`` only depends on ``seed`` and ``i``) and atomic (a folder
is built beside ``root`` and renamed into place), and `ensure_dataset` caches datasets by parameters
under a file lock so concurrent processes generate each one exactly once.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, ImageDraw

T = TypeVar("T")

__all__ = [
    "BACKGROUNDS",
    "BORDER_MARGIN",
    "COLOURS",
    "GENERATOR_VERSION",
    "SHAPES",
    "SIZE_RANGE",
    "SUPERSAMPLE",
    "ShapeSpec",
    "caption",
    "dataset_path",
    "default_workers",
    "ensure_dataset",
    "generate_dataset",
    "render",
    "sample_spec",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 190),
    "orange": (245, 125, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
}

# Bump whenever rendering or sampling changes, so cached datasets are regenerated.
GENERATOR_VERSION = 1
SIZE_RANGE: tuple[float, float] = (0.18, 0.35)
"""Range of `ShapeSpec.size` (circumradius as a fraction of the image side) drawn by `sample_spec`."""
BORDER_MARGIN = 0.05
"""Extra gap (fraction of the image side) `sample_spec` keeps between a shape and the image border."""
SUPERSAMPLE = 4
"""Rendering happens at this multiple of the output resolution, then is downsampled."""

_CIRCLE_VERTICES = 96
_STAR_INNER_RATIO = 0.45
_CROSS_HALF_WIDTH = 0.3
_PROGRESS_THRESHOLD = 200
PARALLEL_FROM = 2000  # below this, starting worker processes costs more than it saves


@dataclass(frozen=True)
class ShapeSpec:
    """Everything needed to render one sample.

    ``cx``/``cy`` are the centre as fractions of the image width/height (y grows downwards),
    ``size`` is the circumradius as a fraction of the image side (every shape fits in the circle of
    that radius), ``rotation`` is a counter-clockwise rotation in degrees.
    """

    shape: str
    colour: str
    background: str
    cx: float
    cy: float
    size: float
    rotation: float


def _check_names(shapes: Sequence[str], colours: Sequence[str], backgrounds: Sequence[str]) -> None:
    """Raise ValueError unless every name is known and no choice list is empty."""
    for kind, names, known in (
        ("shape", shapes, SHAPES),
        ("colour", colours, tuple(COLOURS)),
        ("background", backgrounds, tuple(BACKGROUNDS)),
    ):
        if isinstance(names, str) or len(names) == 0:
            raise ValueError(f"expected a non-empty sequence of {kind} names, got {names!r}")
        unknown = [name for name in names if name not in known]
        if unknown:
            raise ValueError(f"unknown {kind} name(s) {unknown}; choose from {list(known)}")


def sample_spec(
    rng: np.random.Generator,
    shapes: Sequence[str] = SHAPES,
    colours: Sequence[str] = tuple(COLOURS),
    backgrounds: Sequence[str] = tuple(BACKGROUNDS),
) -> ShapeSpec:
    """Draw a random spec whose shape lies fully inside the image (circles are never rotated)."""
    _check_names(shapes, colours, backgrounds)
    shape = shapes[int(rng.integers(len(shapes)))]
    colour = colours[int(rng.integers(len(colours)))]
    background = backgrounds[int(rng.integers(len(backgrounds)))]
    size = float(rng.uniform(*SIZE_RANGE))
    low, high = size + BORDER_MARGIN, 1.0 - size - BORDER_MARGIN
    cx = float(rng.uniform(low, high))
    cy = float(rng.uniform(low, high))
    # Drawn for every shape so the random stream does not depend on which shape was picked.
    rotation = float(rng.uniform(0.0, 360.0))
    if shape == "circle":
        rotation = 0.0
    return ShapeSpec(shape, colour, background, cx, cy, size, rotation)


def caption(spec: ShapeSpec) -> str:
    """Return the caption of a spec, e.g. ``"a red circle on a gray background"``."""
    return f"a {spec.colour} {spec.shape} on a {spec.background} background"


def _unit_outline(shape: str) -> list[tuple[float, float]]:
    """Return (radius, angle in degrees) vertices of an unrotated shape inside the unit circle."""
    if shape == "circle":
        return [(1.0, 360.0 * k / _CIRCLE_VERTICES) for k in range(_CIRCLE_VERTICES)]
    if shape == "square":
        return [(1.0, 45.0 + 90.0 * k) for k in range(4)]
    if shape == "triangle":
        return [(1.0, 90.0 + 120.0 * k) for k in range(3)]
    if shape == "hexagon":
        return [(1.0, 60.0 * k) for k in range(6)]
    if shape == "star":
        return [(1.0 if k % 2 == 0 else _STAR_INNER_RATIO, 90.0 + 36.0 * k) for k in range(10)]
    if shape == "cross":
        return _cross_outline()
    raise ValueError(f"unknown shape {shape!r}; choose from {list(SHAPES)}")


def _cross_outline() -> list[tuple[float, float]]:
    """Return the vertices of a plus sign whose arm corners touch the unit circle."""
    w = _CROSS_HALF_WIDTH
    arm = math.sqrt(1.0 - w * w)  # arm length chosen so the outer corners lie on the unit circle
    points: list[tuple[float, float]] = []
    for quarter in range(4):
        # One arm (pointing along +x before rotating by `quarter` right angles) contributes 3 vertices.
        for x, y in ((w, -w), (arm, -w), (arm, w)):
            angle = math.radians(90.0 * quarter)
            px = x * math.cos(angle) - y * math.sin(angle)
            py = x * math.sin(angle) + y * math.cos(angle)
            points.append((math.hypot(px, py), math.degrees(math.atan2(py, px))))
    return points


def _outline_pixels(spec: ShapeSpec, side: int) -> list[tuple[float, float]]:
    """Return the shape's polygon in pixel coordinates of a ``side`` x ``side`` canvas.

    PIL fills every pixel whose span ``[floor(x0), floor(x1)]`` a scanline crosses; with unshifted
    coordinates that grows the shape by half a (supersampled) pixel on every side, symmetrically.
    """
    cx, cy, radius = spec.cx * side, spec.cy * side, spec.size * side
    points = []
    for r, angle in _unit_outline(spec.shape):
        theta = math.radians(angle + spec.rotation)
        points.append((cx + radius * r * math.cos(theta), cy - radius * r * math.sin(theta)))
    return points


def render(spec: ShapeSpec, resolution: int) -> tuple[Image.Image, np.ndarray]:
    """Render a spec to an RGB image and a uint8 (H, W) semantic map.

    The shape is rasterised once, as a mask at `SUPERSAMPLE` times the resolution. The image is that
    mask downsampled with LANCZOS (smooth edges) blending background and shape colour; a map pixel
    holds the class id when the shape covers at least half of it, so the map boundary runs where the
    image is about halfway between the two colours.
    """
    if resolution < 1:
        raise ValueError(f"resolution must be positive, got {resolution}")
    try:
        fg = COLOURS[spec.colour]
        bg = BACKGROUNDS[spec.background]
    except KeyError as err:
        raise ValueError(f"unknown colour or background in {spec}") from err
    if spec.shape not in SHAPES:
        raise ValueError(f"unknown shape {spec.shape!r}; choose from {list(SHAPES)}")
    class_id = SHAPES.index(spec.shape) + 1

    side = resolution * SUPERSAMPLE
    mask = Image.new("L", (side, side), 0)
    ImageDraw.Draw(mask).polygon(_outline_pixels(spec, side), fill=255)

    # LANCZOS is linear, so filtering the mask and then blending the two colours equals filtering the
    # RGB raster, at a third of the cost (and ringing cannot push colours past fg or bg).
    alpha = mask.resize((resolution, resolution), Image.Resampling.LANCZOS)
    size = (resolution, resolution)
    image = Image.composite(Image.new("RGB", size, fg), Image.new("RGB", size, bg), alpha)

    coverage = np.asarray(mask.reduce(SUPERSAMPLE))  # mean of each SUPERSAMPLE x SUPERSAMPLE block
    semantic = np.where(coverage >= 128, np.uint8(class_id), np.uint8(0))
    return image, semantic


def _progress(items: Iterable[T], total: int, images: Callable[[T], int] = lambda _: 1) -> Iterator[T]:
    """Yield ``items`` under a tqdm bar of ``total`` images (``images(item)`` each) when the job is long."""
    if total <= _PROGRESS_THRESHOLD:
        yield from items
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:
        yield from items
        return
    with tqdm(total=total, desc="shapes dataset", unit="img") as bar:
        for item in items:
            yield item
            bar.update(images(item))


def _render_files(
    folder: Path,
    indices: Iterable[int],
    resolution: int,
    seed: int,
    shapes: Sequence[str],
    colours: Sequence[str],
    backgrounds: Sequence[str],
) -> list[str]:
    """Render and write images ``indices`` into ``folder``; return their metadata lines in order."""
    records = []
    for i in indices:
        spec = sample_spec(np.random.default_rng([seed, i]), shapes, colours, backgrounds)
        image, semantic = render(spec, resolution)
        name = f"{i:05d}.png"
        image.save(folder / "images" / name, format="PNG")
        Image.fromarray(semantic).save(folder / "maps" / name, format="PNG")
        record = {
            "file_name": f"images/{name}",
            "text": caption(spec),
            "map": f"maps/{name}",
            "shape": spec.shape,
            "colour": spec.colour,
            "background": spec.background,
        }
        records.append(json.dumps(record) + "\n")
    return records


def default_workers(num_images: int) -> int:
    """Processes to render with: one for small datasets, else the CPUs this process may use (≤ 16)."""
    if num_images < PARALLEL_FROM:
        return 1
    return max(1, min(16, len(os.sched_getaffinity(0))))


def _can_spawn() -> bool:
    """Whether "spawn" workers can start: they re-run ``__main__`` from its file, and a script read
    from stdin (``python -``) has a file name that does not exist."""
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    return main_file is None or Path(main_file).exists()


def _write_dataset(
    folder: Path,
    num_images: int,
    resolution: int,
    seed: int,
    shapes: Sequence[str],
    colours: Sequence[str],
    backgrounds: Sequence[str],
    workers: int,
) -> None:
    """Write all files of a dataset into an existing, empty ``folder``."""
    (folder / "images").mkdir()
    (folder / "maps").mkdir()
    args = (resolution, seed, shapes, colours, backgrounds)
    if workers <= 1 or not _can_spawn():
        records = _render_files(folder, _progress(range(num_images), num_images), *args)
    else:
        # Image i depends only on (seed, i), so chunks rendered in any order give the same files.
        step = max(1, math.ceil(num_images / (workers * 8)))
        chunks = [range(start, min(start + step, num_images)) for start in range(0, num_images, step)]
        # spawn, not fork: the caller may hold torch's thread pools, which do not survive a fork.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            render_chunk = functools.partial(
                _render_files,
                folder,
                resolution=resolution,
                seed=seed,
                shapes=shapes,
                colours=colours,
                backgrounds=backgrounds,
            )
            parts = pool.map(render_chunk, chunks)
            records = [line for part in _progress(parts, num_images, len) for line in part]
    (folder / "metadata.jsonl").write_text("".join(records), encoding="utf-8")
    (folder / "classes.json").write_text(json.dumps(["background", *SHAPES]) + "\n", encoding="utf-8")


def generate_dataset(
    root: Path,
    num_images: int,
    resolution: int,
    seed: int,
    shapes: Sequence[str] = SHAPES,
    colours: Sequence[str] = tuple(COLOURS),
    backgrounds: Sequence[str] = tuple(BACKGROUNDS),
    workers: int | None = None,
) -> Path:
    """Generate a dataset at ``root`` (which must not exist) and return ``root``.

    Output is byte-identical for identical arguments, and image ``i`` only depends on ``seed`` and
    ``i`` (so ``workers`` processes, default `default_workers`, give the same files as one). Files
    are written to a temporary sibling folder that is renamed to ``root`` at the end,
    so ``root`` either does not exist or is complete.
    """
    root = Path(root)
    _check_names(shapes, colours, backgrounds)
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}")
    if resolution < 1:
        raise ValueError(f"resolution must be positive, got {resolution}")
    if root.exists():
        raise FileExistsError(f"dataset folder already exists: {root}")

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    if tmp.exists():  # left behind by a killed process that had our pid
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        count = default_workers(num_images) if workers is None else workers
        _write_dataset(tmp, num_images, resolution, seed, shapes, colours, backgrounds, count)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def dataset_path(
    cache_dir: Path,
    num_images: int,
    resolution: int,
    seed: int,
    shapes: Sequence[str] = SHAPES,
    colours: Sequence[str] = tuple(COLOURS),
    backgrounds: Sequence[str] = tuple(BACKGROUNDS),
) -> Path:
    """Return the cache folder `ensure_dataset` uses for these parameters (without creating it)."""
    params = {
        "version": GENERATOR_VERSION,
        "num_images": num_images,
        "resolution": resolution,
        "seed": seed,
        "shapes": list(shapes),
        "colours": list(colours),
        "backgrounds": list(backgrounds),
    }
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"shapes-{key}"


def ensure_dataset(
    cache_dir: Path,
    num_images: int,
    resolution: int,
    seed: int,
    shapes: Sequence[str] = SHAPES,
    colours: Sequence[str] = tuple(COLOURS),
    backgrounds: Sequence[str] = tuple(BACKGROUNDS),
    workers: int | None = None,
) -> Path:
    """Return the cached dataset for these parameters, generating it first if it is missing.

    Safe to call from several processes at once (e.g. DDP ranks): generation runs under an
    exclusive ``flock`` on ``shapes-<key>.lock`` beside the folder, so it happens exactly once.
    """
    root = dataset_path(cache_dir, num_images, resolution, seed, shapes, colours, backgrounds)
    if root.exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    lock_path = root.with_name(f"{root.name}.lock")
    with open(lock_path, "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if root.exists():  # another process generated it while we waited for the lock
                return root
            # Holding the lock means nobody else is generating this key: any tmp folder is stale.
            for stale in root.parent.glob(f"{root.name}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            return generate_dataset(root, num_images, resolution, seed, shapes, colours, backgrounds, workers)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
