"""Tests for the synthetic shapes-world dataset generator."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from sdtune.data import shapes
from sdtune.data.shapes import (
    BACKGROUNDS,
    BORDER_MARGIN,
    COLOURS,
    SHAPES,
    SIZE_RANGE,
    ShapeSpec,
    caption,
    dataset_path,
    ensure_dataset,
    generate_dataset,
    render,
    sample_spec,
)

PACKAGE_PARENT = Path(shapes.__file__).resolve().parents[2]


def _blend_fraction(image: Image.Image, spec: ShapeSpec) -> np.ndarray:
    """Per pixel, how far the colour lies along the background -> shape colour segment (0 = bg, 1 = fg)."""
    pixels = np.asarray(image, dtype=np.float64)
    fg = np.array(COLOURS[spec.colour], dtype=np.float64)
    bg = np.array(BACKGROUNDS[spec.background], dtype=np.float64)
    direction = fg - bg
    return ((pixels - bg) @ direction) / (direction @ direction)


def _dominant(pixels: np.ndarray) -> np.ndarray:
    """Most frequent RGB value among (N, 3) pixels."""
    values, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
    return values[counts.argmax()].astype(np.int64)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    """Map every file under root (relative path) to its content."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _tmp_siblings(root: Path) -> list[Path]:
    return sorted(root.parent.glob(f"{root.name}.tmp-*"))


def test_palette_is_well_separated() -> None:
    palette = [np.array(c, dtype=float) for c in [*COLOURS.values(), *BACKGROUNDS.values()]]
    assert len(COLOURS) == 6 and len(BACKGROUNDS) == 3
    for i, a in enumerate(palette):
        for b in palette[i + 1 :]:
            assert np.linalg.norm(a - b) > 60


def test_caption_format() -> None:
    spec = ShapeSpec("circle", "red", "gray", 0.5, 0.5, 0.2, 0.0)
    assert caption(spec) == "a red circle on a gray background"
    spec = ShapeSpec("hexagon", "purple", "white", 0.5, 0.5, 0.2, 30.0)
    assert caption(spec) == "a purple hexagon on a white background"


def test_sample_spec_bounds_and_variety() -> None:
    rng = np.random.default_rng(0)
    specs = [sample_spec(rng) for _ in range(600)]
    for spec in specs:
        assert SIZE_RANGE[0] <= spec.size <= SIZE_RANGE[1]
        for centre in (spec.cx, spec.cy):
            assert spec.size + BORDER_MARGIN <= centre <= 1.0 - spec.size - BORDER_MARGIN
        if spec.shape == "circle":
            assert spec.rotation == 0.0
        assert 0.0 <= spec.rotation < 360.0
    assert {s.shape for s in specs} == set(SHAPES)
    assert {s.colour for s in specs} == set(COLOURS)
    assert {s.background for s in specs} == set(BACKGROUNDS)
    assert len({round(s.rotation) for s in specs if s.shape != "circle"}) > 100
    assert np.ptp([s.cx for s in specs]) > 0.3 and np.ptp([s.size for s in specs]) > 0.15

    restricted = [sample_spec(rng, ("star",), ("blue", "green"), ("black",)) for _ in range(50)]
    assert {s.shape for s in restricted} == {"star"}
    assert {s.colour for s in restricted} == {"blue", "green"}
    assert {s.background for s in restricted} == {"black"}
    with pytest.raises(ValueError):
        sample_spec(rng, ("blob",))


@pytest.mark.parametrize("resolution", [32, 64])
def test_render_map_ids_and_colours(resolution: int) -> None:
    for i in range(60):
        spec = sample_spec(np.random.default_rng([7, i]))
        image, semantic = render(spec, resolution)
        assert image.mode == "RGB" and image.size == (resolution, resolution)
        assert semantic.dtype == np.uint8 and semantic.shape == (resolution, resolution)

        inside = semantic > 0
        assert set(np.unique(semantic).tolist()) == {0, SHAPES.index(spec.shape) + 1}
        pixels = np.asarray(image).reshape(-1, 3)
        assert np.abs(_dominant(pixels[inside.ravel()]) - COLOURS[spec.colour]).max() <= 3
        assert np.abs(_dominant(pixels[~inside.ravel()]) - BACKGROUNDS[spec.background]).max() <= 3

        # Map and image edges agree: clearly shape-coloured pixels are in the map, clearly
        # background-coloured ones are not.
        blend = _blend_fraction(image, spec)
        assert inside[blend > 0.75].all()
        assert not inside[blend < 0.25].any()


def test_render_edges_are_antialiased() -> None:
    spec = ShapeSpec("triangle", "red", "white", 0.5, 0.5, 0.35, 10.0)
    image, _ = render(spec, 64)
    blend = _blend_fraction(image, spec)
    assert ((blend > 0.15) & (blend < 0.85)).sum() >= 20


def test_shapes_stay_inside_image_at_extreme_positions() -> None:
    size = SIZE_RANGE[1]
    low, high = size + BORDER_MARGIN, 1.0 - size - BORDER_MARGIN
    for shape in SHAPES:
        for rotation in np.arange(0.0, 360.0, 6.0):
            for cx, cy in ((low, low), (high, high), (low, high), (high, low)):
                spec = ShapeSpec(shape, "red", "black", cx, cy, size, float(rotation))
                for resolution in (16, 32, 64):
                    _, semantic = render(spec, resolution)
                    assert semantic.any()
                    border = np.concatenate([semantic[0], semantic[-1], semantic[:, 0], semantic[:, -1]])
                    assert not border.any(), (spec, resolution)


@pytest.mark.parametrize("shape", SHAPES)
def test_size_is_circumradius(shape: str) -> None:
    resolution, size = 128, 0.35
    radius = size * resolution
    for rotation in np.arange(0.0, 90.0, 7.0):
        spec = ShapeSpec(shape, "red", "black", 0.5, 0.5, size, float(rotation))
        _, semantic = render(spec, resolution)
        ys, xs = np.nonzero(semantic)
        distance = np.hypot(xs + 0.5 - resolution / 2, ys + 0.5 - resolution / 2)
        assert distance.max() <= radius + 1.0
        assert distance.max() >= radius - 3.0


def test_generate_dataset_layout_and_metadata(tmp_path: Path) -> None:
    root = generate_dataset(tmp_path / "ds", num_images=8, resolution=32, seed=1)
    assert root == tmp_path / "ds"
    assert json.loads((root / "classes.json").read_text()) == ["background", *SHAPES]
    lines = (root / "metadata.jsonl").read_text().splitlines()
    assert len(lines) == 8
    assert sorted(p.name for p in (root / "images").iterdir()) == [f"{i:05d}.png" for i in range(8)]
    assert sorted(p.name for p in (root / "maps").iterdir()) == [f"{i:05d}.png" for i in range(8)]
    for i, line in enumerate(lines):
        record = json.loads(line)
        assert list(record) == ["file_name", "text", "map", "shape", "colour", "background"]
        assert record["file_name"] == f"images/{i:05d}.png"
        assert record["map"] == f"maps/{i:05d}.png"
        spec = ShapeSpec(record["shape"], record["colour"], record["background"], 0.5, 0.5, 0.2, 0.0)
        assert record["text"] == caption(spec)

        with Image.open(root / record["file_name"]) as image:
            assert image.mode == "RGB" and image.size == (32, 32)
            pixels = np.asarray(image)
        with Image.open(root / record["map"]) as map_image:
            assert map_image.mode == "L"
            semantic = np.asarray(map_image)
        assert set(np.unique(semantic).tolist()) == {0, SHAPES.index(record["shape"]) + 1}
        assert np.abs(_dominant(pixels[semantic > 0]) - COLOURS[record["colour"]]).max() <= 3

        # Stored files are exactly what rendering the i-th spec gives.
        expected_spec = sample_spec(np.random.default_rng([1, i]))
        expected_image, expected_map = render(expected_spec, 32)
        np.testing.assert_array_equal(pixels, np.asarray(expected_image))
        np.testing.assert_array_equal(semantic, expected_map)
    assert _tmp_siblings(root) == []


def test_generate_dataset_restricted_choices(tmp_path: Path) -> None:
    root = generate_dataset(
        tmp_path / "ds", 12, 16, 0, shapes=("cross",), colours=("green",), backgrounds=("white",)
    )
    records = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    assert {r["text"] for r in records} == {"a green cross on a white background"}


def test_generate_dataset_is_deterministic(tmp_path: Path) -> None:
    first = _tree_bytes(generate_dataset(tmp_path / "a", 6, 32, seed=5))
    second = _tree_bytes(generate_dataset(tmp_path / "b", 6, 32, seed=5))
    assert first == second
    other_seed = _tree_bytes(generate_dataset(tmp_path / "c", 6, 32, seed=6))
    assert other_seed["images/00000.png"] != first["images/00000.png"]


def test_image_i_does_not_depend_on_num_images(tmp_path: Path) -> None:
    small = generate_dataset(tmp_path / "small", 5, 32, seed=3)
    large = generate_dataset(tmp_path / "large", 10, 32, seed=3)
    for i in range(5):
        for folder in ("images", "maps"):
            name = f"{folder}/{i:05d}.png"
            assert (small / name).read_bytes() == (large / name).read_bytes()
    small_lines = (small / "metadata.jsonl").read_text().splitlines()
    assert small_lines == (large / "metadata.jsonl").read_text().splitlines()[:5]


def test_parallel_generation_writes_the_same_files(tmp_path: Path) -> None:
    serial = _tree_bytes(generate_dataset(tmp_path / "serial", 37, 32, seed=4, workers=1))
    parallel = _tree_bytes(generate_dataset(tmp_path / "parallel", 37, 32, seed=4, workers=2))
    assert parallel == serial
    assert len([name for name in parallel if name.startswith("images/")]) == 37


def test_parallel_generation_from_a_script_on_stdin(tmp_path: Path) -> None:
    # spawn workers re-run __main__ from its file; "python -" has none, so this must fall back to one process
    script = (
        "from pathlib import Path\n"
        "from sdtune.data.shapes import generate_dataset\n"
        f"generate_dataset(Path({str(tmp_path / 'ds')!r}), 12, 16, seed=1, workers=2)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(PACKAGE_PARENT)}
    done = subprocess.run(
        [sys.executable, "-"], input=script, text=True, capture_output=True, env=env, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert len(list((tmp_path / "ds" / "images").iterdir())) == 12


def test_default_workers() -> None:
    assert shapes.default_workers(shapes.PARALLEL_FROM - 1) == 1
    assert 1 <= shapes.default_workers(shapes.PARALLEL_FROM) <= 16


def test_generate_dataset_refuses_existing_root(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    root.mkdir()
    with pytest.raises(FileExistsError):
        generate_dataset(root, 2, 16, 0)


def test_failed_generation_leaves_no_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "ds"
    with pytest.raises(ValueError):
        generate_dataset(root, 4, 16, 0, colours=("red", "magenta"))
    assert not root.exists()

    calls = 0
    real_render = shapes.render

    def failing_render(spec: ShapeSpec, resolution: int) -> Any:
        nonlocal calls
        calls += 1
        if calls == 4:
            raise RuntimeError("boom")
        return real_render(spec, resolution)

    monkeypatch.setattr(shapes, "render", failing_render)
    with pytest.raises(RuntimeError, match="boom"):
        generate_dataset(root, 10, 16, 0)
    assert calls == 4
    assert not root.exists()
    assert _tmp_siblings(root) == []


def test_killed_generation_leaves_no_root(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    script = (
        "import sys; from pathlib import Path; from sdtune.data.shapes import generate_dataset; "
        "generate_dataset(Path(sys.argv[1]), 10**6, 16, 0)"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(PACKAGE_PARENT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen([sys.executable, "-c", script, str(root)], env=env, stderr=subprocess.DEVNULL)
    try:
        images = root.with_name(f"{root.name}.tmp-{proc.pid}") / "images"
        deadline = time.monotonic() + 30
        while not (images.is_dir() and len(list(images.iterdir())) >= 5):
            assert proc.poll() is None, "generator exited early"
            assert time.monotonic() < deadline, "generator made no progress"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not root.exists()


def test_ensure_dataset_cleans_stale_tmp_and_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = dataset_path(tmp_path, 4, 16, 0)
    stale = expected.with_name(f"{expected.name}.tmp-999999")
    (stale / "images").mkdir(parents=True)

    root = ensure_dataset(tmp_path, 4, 16, 0)
    assert root == expected and root.name.startswith("shapes-")
    assert len(list((root / "images").iterdir())) == 4
    assert not stale.exists()

    def no_generation(*args: Any, **kwargs: Any) -> Path:
        raise AssertionError("dataset should have come from the cache")

    monkeypatch.setattr(shapes, "generate_dataset", no_generation)
    assert ensure_dataset(tmp_path, 4, 16, 0) == root


def test_dataset_path_depends_on_every_parameter(tmp_path: Path) -> None:
    base = dataset_path(tmp_path, 10, 32, 0)
    assert base == dataset_path(tmp_path, 10, 32, 0)
    variants = [
        dataset_path(tmp_path, 11, 32, 0),
        dataset_path(tmp_path, 10, 64, 0),
        dataset_path(tmp_path, 10, 32, 1),
        dataset_path(tmp_path, 10, 32, 0, shapes=("circle",)),
        dataset_path(tmp_path, 10, 32, 0, colours=("red",)),
        dataset_path(tmp_path, 10, 32, 0, backgrounds=("gray",)),
    ]
    assert len({base, *variants}) == 1 + len(variants)


def _ensure_worker(cache_dir: str, log_path: str, barrier: Any, results: Any) -> None:
    """Spawned worker: call ensure_dataset, logging every generation it performs."""
    real_generate = shapes.generate_dataset

    def logged_generate(*args: Any, **kwargs: Any) -> Path:
        with open(log_path, "a") as log:
            log.write(f"{os.getpid()}\n")
        time.sleep(0.3)  # keep the race window open so an unlocked implementation would generate twice
        return real_generate(*args, **kwargs)

    shapes.generate_dataset = logged_generate  # type: ignore[assignment]
    barrier.wait(timeout=60)
    results.put(str(shapes.ensure_dataset(Path(cache_dir), 20, 16, 3)))


def test_ensure_dataset_concurrent_processes_generate_once(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    log_path = tmp_path / "generations.log"
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    results = ctx.Queue()
    workers = [
        ctx.Process(target=_ensure_worker, args=(str(cache_dir), str(log_path), barrier, results))
        for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    paths = [results.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0

    assert paths[0] == paths[1]
    root = Path(paths[0])
    assert root == dataset_path(cache_dir, 20, 16, 3)
    assert len(log_path.read_text().splitlines()) == 1
    assert len(list((root / "images").iterdir())) == 20
    assert len((root / "metadata.jsonl").read_text().splitlines()) == 20
    assert sorted(p.name for p in cache_dir.iterdir()) == sorted([root.name, f"{root.name}.lock"])


def test_render_is_fast() -> None:
    specs = [sample_spec(np.random.default_rng([0, i])) for i in range(200)]
    start = time.perf_counter()
    for spec in specs:
        render(spec, 64)
    # 200 renders in < 2 s means 1000 in < 10 s, with a wide margin for slow CI machines (~0.1 s here).
    assert time.perf_counter() - start < 2.0
