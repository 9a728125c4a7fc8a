"""Edit pairs (InstructPix2Pix-style): a source image, an instruction, and the target image it should become.

Layout under `data.root`: `metadata.jsonl`, one `{"source": …, "target": …, "instruction": …}` per line
(paths relative to the root; key names: `data.source_column`, `.target_column`, `.instruction_column`).
With `data.root` null the shapes world makes pairs: the same shape in another colour or on another background
("make it blue", "put it on a white background").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sdtune.data.conditioned import ConditionedDataModule, RecordDataset, oriented_size
from sdtune.data.joint import JointTransform
from sdtune.data.records import DataError, Records, metadata_entries
from sdtune.io import build_once

PAIRS_VERSION = 1


@dataclass
class PairRecords(Records):
    """Records (`images` are the targets, `captions` the instructions) with their source images."""

    sources: list[Path] = field(default_factory=list)


def find_pair_records(
    folder: Path, source_column: str, target_column: str, instruction_column: str
) -> PairRecords:
    """The pairs listed in `folder/metadata.jsonl`; every bad line or file is recorded in `problems`."""
    records = PairRecords([], [], [])
    metadata = folder / "metadata.jsonl"
    if not metadata.is_file():
        raise DataError(
            f"data.root {folder}: no metadata.jsonl; an edit-pairs folder lists its pairs there, one JSON "
            f"line each with '{source_column}', '{target_column}' and '{instruction_column}'"
        )
    for where, entry in metadata_entries(metadata, records):
        values = [entry.get(c) for c in (source_column, target_column, instruction_column)]
        if not all(isinstance(v, str) for v in values):
            records.problems.append(
                (where, f"needs '{source_column}', '{target_column}' and '{instruction_column}' strings")
            )
            continue
        source, target = (folder / values[0]).resolve(), (folder / values[1]).resolve()
        problem = _pair_problem(folder, source, target, values[2])
        if problem:
            records.problems.append(problem)
            continue
        records.add(target, values[2].strip(), str(target))
        records.sources.append(source)
    return records


def _pair_problem(folder: Path, source: Path, target: Path, instruction: str) -> tuple[str, str] | None:
    for path in (source, target):
        if not path.is_relative_to(folder):
            return str(path), "path points outside the data root"
        if not path.is_file():
            return str(path), "image does not exist"
    if not instruction.strip():
        return str(target), "empty instruction"
    try:
        source_size, target_size = oriented_size(source), oriented_size(target)
    except OSError as error:
        return str(source), f"not a readable image ({error})"
    if source_size != target_size:
        return (
            str(source),
            f"source is {source_size[0]}x{source_size[1]} but target {target.name} is "
            f"{target_size[0]}x{target_size[1]}; a pair's images must have the same size",
        )
    return None


class EditPairsDataset(RecordDataset):
    """Target pixels (`pixel_values`), source pixels (`source_pixel_values`, same crop and flip) and the
    instruction (`caption`) of each pair, all in [-1, 1]."""

    def __init__(self, records: PairRecords, transform: JointTransform) -> None:
        self.records = records
        self.transform = transform

    def item(
        self, index: int, augment: bool = True, generator: torch.Generator | None = None
    ) -> dict[str, Any]:
        with (
            Image.open(self.records.images[index]) as target,
            Image.open(self.records.sources[index]) as source,
        ):
            target, source = target.copy(), source.copy()
        pixels, aligned = self.transform(
            target, images={"source_pixel_values": source}, augment=augment, generator=generator
        )
        return {"pixel_values": pixels, **aligned, "caption": self.records.captions[index]}


class EditPairsDataModule(ConditionedDataModule):
    """Edit pairs from `root`, or shapes-world pairs generated into the cache when it is null."""

    batch_keys = ("pixel_values", "caption", "source_pixel_values")

    def __init__(
        self,
        source_column: str = "source",
        target_column: str = "target",
        instruction_column: str = "instruction",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.columns = (source_column, target_column, instruction_column)

    def generate_root(self) -> Path:
        return ensure_shape_pairs(Path(self.cache_dir), self.num_images, self.transform.resolution, self.seed)

    def find_records(self) -> PairRecords:
        return find_pair_records(Path(self.root).expanduser().resolve(), *self.columns)

    def make_dataset(self, records: PairRecords) -> EditPairsDataset:
        return EditPairsDataset(records, self.joint)


def ensure_shape_pairs(cache_dir: Path, num_pairs: int, resolution: int, seed: int) -> Path:
    """Shapes-world edit pairs in the cache, generated once (safe across processes)."""
    from sdtune.data.shapes import GENERATOR_VERSION

    params = [GENERATOR_VERSION, PAIRS_VERSION, num_pairs, resolution, seed]
    key = hashlib.sha256(json.dumps(params).encode()).hexdigest()[:16]
    return build_once(
        cache_dir / f"shape-pairs-{key}", lambda out: write_shape_pairs(out, num_pairs, resolution, seed)
    )


def write_shape_pairs(out: Path, num_pairs: int, resolution: int, seed: int) -> None:
    """Write `num_pairs` pairs: pair i depends only on `seed` and i."""
    from sdtune.data.shapes import BACKGROUNDS, COLOURS, render, sample_spec

    for part in ("source", "target"):
        (out / part).mkdir(parents=True)
    lines = []
    for i in range(num_pairs):
        rng = np.random.default_rng([seed, i, 1])
        source = sample_spec(rng)
        if rng.random() < 0.7:
            colour = str(rng.choice([c for c in COLOURS if c != source.colour]))
            target, instruction = dataclasses.replace(source, colour=colour), f"make it {colour}"
        else:
            background = str(rng.choice([b for b in BACKGROUNDS if b != source.background]))
            target = dataclasses.replace(source, background=background)
            instruction = f"put it on a {background} background"
        name = f"{i:05d}.png"
        for part, spec in (("source", source), ("target", target)):
            render(spec, resolution)[0].save(out / part / name, format="PNG")
        lines.append(
            json.dumps({"source": f"source/{name}", "target": f"target/{name}", "instruction": instruction})
        )
    (out / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
