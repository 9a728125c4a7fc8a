"""Images with captions and a precomputed representation vector next to each image.

Any image-folder layout of `data=captions` (metadata.jsonl or caption sidecars) plus, beside `img.png`, either
`img.npy` or `img.safetensors` (one tensor, or the one named `data.vector_key`) of shape (dim,) or (N, dim),
dim = `data.representation_dim`. With `data.root` null, the shapes world gets attribute vectors (one-hot
shape, colour and background, then centre x, y and size: 18 numbers).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from sdtune.data.conditioned import ConditionedDataModule, RecordDataset
from sdtune.data.joint import JointTransform
from sdtune.data.records import DataError, Records, discover
from sdtune.io import build_once

VECTOR_SUFFIXES = (".npy", ".safetensors")
SHAPES_VECTORS_VERSION = 1


@dataclass
class VectorRecords(Records):
    """Records with the vector file of each image."""

    vectors: list[Path] = field(default_factory=list)


def read_vector(path: Path, key: str | None = None) -> Tensor:
    """A float32 tensor from a `.npy` file or a `.safetensors` file (its only tensor, or `key`)."""
    if path.suffix == ".npy":
        return torch.from_numpy(np.load(path, allow_pickle=False).astype(np.float32))
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    if key is None and len(tensors) != 1:
        raise DataError(f"{path}: holds {sorted(tensors)}; set data.vector_key to the one to use")
    return tensors[key if key is not None else next(iter(tensors))].float()


def vector_shape(path: Path, key: str | None) -> tuple[int, ...]:
    """The shape of the vector in `path`, read without loading it."""
    if path.suffix == ".npy":
        return tuple(np.load(path, mmap_mode="r", allow_pickle=False).shape)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        if key is None and len(keys) != 1:
            raise ValueError(f"holds {keys}; set data.vector_key to the one to use")
        name = key if key is not None else keys[0]
        if name not in keys:
            raise ValueError(f"has no tensor {name!r} (data.vector_key); it holds {keys}")
        return tuple(f.get_slice(name).get_shape())


def attach_vectors(records: Records, dim: int, key: str | None) -> VectorRecords:
    """`records` with the vector beside each image; missing or misshapen vectors go to `problems`."""
    out = VectorRecords([], [], [], problems=list(records.problems))
    if records.hf_dataset is not None:
        out.problems.append(
            ("data.hf_name", "representation vectors are read beside image files; use data.root")
        )
        return out
    for image, caption, name in zip(records.images, records.captions, records.names):
        found = [image.with_suffix(s) for s in VECTOR_SUFFIXES if image.with_suffix(s).is_file()]
        if not found:
            out.problems.append((str(image), f"no representation vector {image.stem}.npy or .safetensors"))
            continue
        try:
            shape = vector_shape(found[0], key)
        except (ValueError, OSError) as error:
            out.problems.append((str(found[0]), f"unreadable vector ({error})"))
            continue
        if len(shape) not in (1, 2) or shape[-1] != dim:
            out.problems.append(
                (
                    str(found[0]),
                    f"vector has shape {shape}; expected ({dim},) or (N, {dim}) "
                    f"(data.representation_dim={dim})",
                )
            )
            continue
        out.add(image, caption, name)
        out.vectors.append(found[0])
    return out


class RepresentationDataset(RecordDataset):
    """Pixels in [-1, 1], the caption and the representation vector of each record."""

    def __init__(self, records: VectorRecords, transform: JointTransform, key: str | None) -> None:
        self.records = records
        self.transform = transform
        self.key = key

    def item(
        self, index: int, augment: bool = True, generator: torch.Generator | None = None
    ) -> dict[str, Any]:
        with Image.open(self.records.images[index]) as opened:
            image = opened.copy()
        pixels, _ = self.transform(image, augment=augment, generator=generator)
        return {
            "pixel_values": pixels,
            "caption": self.records.captions[index],
            "representation": read_vector(self.records.vectors[index], self.key),
        }


class RepresentationDataModule(ConditionedDataModule):
    """Images, captions and vectors from `root`; the shapes world with attribute vectors when it is null."""

    batch_keys = ("pixel_values", "caption", "representation")

    def __init__(self, representation_dim: int, vector_key: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dim = representation_dim
        self.vector_key = vector_key

    def generate_root(self) -> Path:
        return ensure_shapes_with_vectors(
            Path(self.cache_dir), self.num_images, self.transform.resolution, self.seed
        )

    def find_records(self) -> VectorRecords:
        records = discover(self.root, None, **self.discover_kwargs)
        return attach_vectors(records, self.dim, self.vector_key)

    def make_dataset(self, records: VectorRecords) -> RepresentationDataset:
        return RepresentationDataset(records, self.joint, self.vector_key)


def shape_vector(spec: Any) -> np.ndarray:
    """The 18 attribute numbers of a shapes-world sample."""
    from sdtune.data.shapes import BACKGROUNDS, COLOURS, SHAPES

    one_hots = [
        np.eye(len(names), dtype=np.float32)[list(names).index(value)]
        for names, value in ((SHAPES, spec.shape), (COLOURS, spec.colour), (BACKGROUNDS, spec.background))
    ]
    return np.concatenate([*one_hots, np.asarray([spec.cx, spec.cy, spec.size], np.float32)])


def ensure_shapes_with_vectors(cache_dir: Path, num_images: int, resolution: int, seed: int) -> Path:
    """A shapes-world dataset with `images/<i>.npy` attribute vectors, generated once (process-safe)."""
    from sdtune.data.shapes import GENERATOR_VERSION

    params = [GENERATOR_VERSION, SHAPES_VECTORS_VERSION, num_images, resolution, seed]
    key = hashlib.sha256(json.dumps(params).encode()).hexdigest()[:16]

    def build(out: Path) -> None:
        from sdtune.data.shapes import generate_dataset, sample_spec

        generate_dataset(out, num_images, resolution, seed)
        for i in range(num_images):
            spec = sample_spec(np.random.default_rng([seed, i]))  # the generator's own draw for image i
            np.save(out / "images" / f"{i:05d}.npy", shape_vector(spec))

    return build_once(cache_dir / f"shapes-vectors-{key}", build)
