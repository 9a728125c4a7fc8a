"""The latent and text-embedding cache (`data.cache_latents=true`): encode every image and caption once.

One safetensors file per entry, named by a content hash of everything that determines its value:
- latents: the VAE encoder's weights (dtype included) and config, the image's bytes, the size it is resized
  and centre-cropped to, and whether its mirror image is stored too. An entry holds the posterior moments
  (mean and log-variance, `latent_dist.parameters`), so training still samples z0 = μ + σ·ε every step —
  exactly what encoding returns — and, with `data.random_flip`, the moments of the flipped image;
- text: the text encoder's weights, the layer read (clip skip) and the token ids the tokenizer makes of the
  caption (so the tokenizer, truncation and padding are part of the key). The empty caption is cached too,
  for caption dropout.
Anything that changes gives a different name: a stale entry is never read. Files are written atomically, so an
interrupted build keeps what it finished and the next run builds the rest. Each entry records its key and a
checksum: a truncated file is found (and rebuilt) before training, a corrupted one when it is read.
Building runs under a file lock: the first process (DDP rank) builds, the others wait, then find it complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from sdtune.config import ConfigError
from sdtune.data.buckets import Size, fit_image, open_image
from sdtune.data.records import Records
from sdtune.data.sampler import split_item
from sdtune.io import atomic_path

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # bump when what an entry holds, or how images are prepared, changes


class CacheError(RuntimeError):
    """A cache entry is unreadable; the message says what was done about it."""


# ---- hashing ----------------------------------------------------------------------------------------------


def _hasher() -> Any:
    return hashlib.sha1()  # content keys (not security); hardware-accelerated on current CPUs


def digest_of(*parts: Any) -> str:
    """Hash of JSON-able parts."""
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _tensor_parts(tensors: dict[str, Tensor]) -> Iterator[Any]:
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        yield f"{name}|{t.dtype}|{tuple(t.shape)}|".encode()
        yield t.reshape(-1).view(torch.uint8).numpy()  # a buffer: hashed without a copy


def tensors_digest(tensors: dict[str, Tensor]) -> str:
    """Hash of tensors' names, dtypes, shapes and bytes."""
    h = _hasher()
    for part in _tensor_parts(tensors):
        h.update(part)
    return h.hexdigest()


def tensors_checksum(tensors: dict[str, Tensor]) -> str:
    """CRC-32 of the same: cheap enough to verify on every read, enough to catch a damaged file."""
    crc = 0
    for part in _tensor_parts(tensors):
        crc = zlib.crc32(part, crc)
    return f"{crc:08x}"


def module_digest(module: Any) -> str:
    """Identity of a module's weights (and their dtype): equal digests give equal outputs."""
    return tensors_digest(dict(module.state_dict()))


def vae_identity(vae: Any) -> str:
    """What latents depend on: the VAE encoder's weights and the VAE config."""
    parts = {"encoder": vae.encoder}
    if getattr(vae, "quant_conv", None) is not None:
        parts["quant_conv"] = vae.quant_conv
    weights = [f"{name}:{module_digest(m)}" for name, m in parts.items()]
    return digest_of("vae", dict(vae.config), weights)


def image_digest(records: Records, index: int, image_column: str = "image") -> str:
    """Hash of the image's file bytes (or, for a Hugging Face dataset row, its decoded pixels)."""
    h = _hasher()
    if records.hf_dataset is None:
        with open(records.images[index], "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    else:
        image = open_image(records, index, image_column)
        h.update(f"{image.mode}|{image.size}|".encode())
        h.update(image.tobytes())
    return h.hexdigest()


# ---- entries ----------------------------------------------------------------------------------------------


def entry_path(root: Path, kind: str, key: str) -> Path:
    return Path(root) / kind / key[:2] / f"{key}.safetensors"


def write_entry(path: Path, key: str, tensors: dict[str, Tensor]) -> None:
    """Write one entry atomically, with its key and a checksum in the header."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    metadata = {"key": key, "checksum": tensors_checksum(tensors), "version": str(CACHE_VERSION)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def entry_is_complete(path: Path, key: str) -> bool:
    """Cheap check (header only): the file exists, is as long as its header says, and holds `key`."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                return False
            header = json.loads(f.read(header_len))
    except (OSError, ValueError, struct.error):
        return False
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    metadata = header.get("__metadata__") or {}
    return metadata.get("key") == key and size == 8 + header_len + max(ends, default=0)


def read_entry(path: Path, key: str) -> dict[str, Tensor]:
    """Load an entry and verify its checksum; a corrupted entry is deleted and reported."""
    try:
        blob = path.read_bytes()
        (header_len,) = struct.unpack("<Q", blob[:8])
        metadata = json.loads(blob[8 : 8 + header_len]).get("__metadata__") or {}
        tensors = load_tensors(blob)
        good = metadata.get("key") == key and metadata.get("checksum") == tensors_checksum(tensors)
    except Exception:  # safetensors raises its own error types for damaged files
        good = False
    if not good:
        with contextlib.suppress(OSError):
            path.unlink()
        raise CacheError(
            f"latent cache entry {path} is damaged; it has been deleted — run again and it will be rebuilt"
        )
    return tensors


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on `path` (processes on this machine, or a shared filesystem)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ---- the dataset of cached entries ------------------------------------------------------------------------


class CachedDataset(Dataset):
    """Cached posterior moments (`latent_moments`) and caption, with text embeddings when those are cached."""

    def __init__(
        self,
        captions: list[str],
        latents: list[tuple[Path, str]],
        random_flip: bool,
        text: list[tuple[Path, str]] | None = None,
        null_embeds: dict[str, Tensor] | None = None,
        key: str = "caption",
        placements: list[tuple[dict[str, Tensor], dict[str, Tensor]]] | None = None,
    ) -> None:
        self.captions = captions
        self.latents = latents
        self.random_flip = random_flip
        self.text = text
        self.null_embeds = null_embeds
        self.key = key
        self.placements = placements  # SDXL micro-conditioning per sample: (as is, flipped)

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        index, generator = split_item(item)
        entry = read_entry(*self.latents[index])
        flip = self.random_flip and bool(torch.rand((), generator=generator) < 0.5)
        out: dict[str, Any] = {
            "latent_moments": entry["moments_flipped" if flip else "moments"],
            "caption": self.captions[index],
        }
        if self.placements is not None:
            out.update(self.placements[index][int(flip)])
        if self.text is not None:
            text = read_entry(*self.text[index])
            for part, name in (("hidden", "embeds"), ("pooled", "pooled")):  # pooled: SDXL
                if part in text:
                    out[f"{self.key}_{name}"] = text[part]
                    out[f"negative_{self.key}_{name}"] = self.null_embeds[part]
        return out


# ---- building ---------------------------------------------------------------------------------------------


@dataclass
class CacheReport:
    """What `prepare_cache` found and did."""

    root: Path
    latents_built: int = 0
    latents_reused: int = 0
    text_built: int = 0
    text_reused: int = 0
    text_cached: bool = False
    notes: list[str] = field(default_factory=list)


def cache_device(accelerator: str) -> torch.device:
    """Where to encode: this process's GPU when training on one, else the CPU."""
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def prepare_cache(
    datamodule: Any, stack: Any, conditioning: Any, root: Path, device: torch.device, batch_size: int = 8
) -> CacheReport:
    """Build what the cache lacks for `datamodule`'s samples, then swap its dataset for the cached one.

    The text embeddings are cached when every conditioning component is a frozen text encoder; otherwise only
    latents are (and the text encoder runs in the training step as before).
    """
    from sdtune.conditioning.text import TextConditioner

    components = list(conditioning.components.values())
    if any(not isinstance(c, TextConditioner) for c in components):
        raise ConfigError(["data.cache_latents: only text conditioning can train from the cache so far"])
    records, transform = datamodule.records, datamodule.transform
    report = CacheReport(Path(root))
    if not transform.center_crop:
        report.notes.append("random crops cannot be cached: images are centre-cropped (data.center_crop)")
    texts = [c for c in components if not any(p.requires_grad for e in c.encoders for p in e.parameters())]
    report.text_cached = len(texts) == len(components) == 1
    if report.text_cached and getattr(datamodule, "caption_tags", None) is not None:
        report.text_cached = False
        report.notes.append(
            "shuffled captions are encoded every step: text is not cached (data.shuffle_caption, "
            "data.caption_tag_dropout)"
        )
    sdxl = getattr(stack, "text_encoder_2", None) is not None
    column = datamodule.discover_kwargs["image_column"]
    resolution = transform.resolution
    sizes = [
        datamodule.buckets.size_of(i) if datamodule.buckets is not None else (resolution, resolution)
        for i in range(len(records))
    ]
    vae_id = vae_identity(stack.vae)
    latent_keys = [
        digest_of(
            CACHE_VERSION, "latent", vae_id, image_digest(records, i, column), size, transform.random_flip
        )
        for i, size in enumerate(sizes)
    ]
    latents = [(entry_path(root, "latents", k), k) for k in latent_keys]
    with exclusive_lock(Path(root) / ".build.lock"):
        todo = _missing(latents, report, "latents")
        _build_latents(
            stack.vae, records, column, sizes, todo, latents, transform.random_flip, device, batch_size
        )
        report.latents_built = len(todo)
        text = null = None
        if report.text_cached:
            text, null = _prepare_text(texts[0], records.captions, root, device, batch_size, report)
    for note in report.notes:
        log.warning("latent cache: %s", note)
    log.info(
        "latent cache %s: latents %d built / %d reused; text %s",
        root,
        report.latents_built,
        report.latents_reused,
        f"{report.text_built} built / {report.text_reused} reused" if report.text_cached else "not cached",
    )
    key = texts[0].key if report.text_cached else "caption"
    placements = _placements(records, column, sizes) if sdxl else None
    datamodule.dataset = CachedDataset(
        records.captions, latents, transform.random_flip, text, null, key, placements
    )
    return report


def _placements(
    records: Records, column: str, sizes: list[Size]
) -> list[tuple[dict[str, Tensor], dict[str, Tensor]]]:
    """SDXL micro-conditioning of each cached (centre-cropped) sample, as is and flipped."""
    from sdtune.data.buckets import centre_placement, read_image_sizes

    originals = read_image_sizes(records, column)
    return [
        (centre_placement(original, size), centre_placement(original, size, flip=True))
        for original, size in zip(originals, sizes)
    ]


def _missing(entries: list[tuple[Path, str]], report: CacheReport, kind: str) -> list[int]:
    """Indices of the first occurrence of each key whose entry is absent or incomplete."""
    seen, todo = set(), []
    for i, (path, key) in enumerate(entries):
        if key in seen:
            continue
        seen.add(key)
        if entry_is_complete(path, key):
            setattr(report, f"{kind}_reused", getattr(report, f"{kind}_reused") + 1)
        else:
            if path.exists():
                log.warning("latent cache: %s is incomplete or damaged; rebuilding it", path)
            todo.append(i)
    return todo


@contextlib.contextmanager
def _on(module: Any, device: torch.device) -> Iterator[Any]:
    """`module` on `device` for the block, then back where it was."""
    before = next(module.parameters()).device
    module.to(device)
    try:
        yield module
    finally:
        module.to(before)


@torch.no_grad()
def encode_moments(vae: Any, pixels: Tensor) -> Tensor:
    """Posterior moments (mean, log-variance along channels) of the VAE for pixels in [-1, 1]."""
    return vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.parameters


def _build_latents(
    vae: Any,
    records: Records,
    column: str,
    sizes: list[Size],
    todo: list[int],
    latents: list[tuple[Path, str]],
    random_flip: bool,
    device: torch.device,
    batch_size: int,
) -> None:
    if not todo:
        return
    by_size: dict[Size, list[int]] = {}
    for i in todo:
        by_size.setdefault(sizes[i], []).append(i)
    with _on(vae, device), tqdm(total=len(todo), desc="caching latents", unit="img") as bar:
        for size, indices in by_size.items():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start : start + batch_size]
                pixels = torch.stack([fit_image(open_image(records, i, column), size) for i in chunk])
                moments = encode_moments(vae, pixels)
                flipped = encode_moments(vae, torch.flip(pixels, dims=[-1])) if random_flip else None
                for j, i in enumerate(chunk):
                    tensors = {"moments": moments[j]}
                    if flipped is not None:
                        tensors["moments_flipped"] = flipped[j]
                    write_entry(*latents[i], tensors)
                bar.update(len(chunk))


@torch.no_grad()
def encode_text(component: Any, ids: Tensor) -> dict[str, Tensor]:
    """What a text entry holds: `hidden` states (SDXL: both encoders' and the `pooled` embedding)."""
    if component.text_encoder_2 is not None:
        hidden, pooled = component.encode_xl_ids(ids)
        return {"hidden": hidden, "pooled": pooled}
    return {"hidden": component.hidden_states(ids)}


def token_ids(component: Any, captions: list[str]) -> Tensor:
    return component.token_ids(captions)


def _prepare_text(
    component: Any,
    captions: list[str],
    root: Path,
    device: torch.device,
    batch_size: int,
    report: CacheReport,
) -> tuple[list[tuple[Path, str]], dict[str, Tensor]]:
    text_id = digest_of(
        "text", *(module_digest(encoder) for encoder in component.encoders), component.clip_skip
    )
    all_captions = [*captions, ""]
    ids = token_ids(component, all_captions)
    keys = [digest_of(CACHE_VERSION, "text", text_id, row.tolist()) for row in ids]
    entries = [(entry_path(root, "text", k), k) for k in keys]
    todo = _missing(entries, report, "text")
    if todo:
        with (
            contextlib.ExitStack() as on_device,
            tqdm(total=len(todo), desc="caching text", unit="caption") as bar,
        ):
            for encoder in component.encoders:
                on_device.enter_context(_on(encoder, device))
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                encoded = encode_text(component, ids[chunk])
                for j, i in enumerate(chunk):
                    write_entry(*entries[i], {name: tensor[j] for name, tensor in encoded.items()})
                bar.update(len(chunk))
    report.text_built = len(todo)
    return entries[:-1], read_entry(*entries[-1])
