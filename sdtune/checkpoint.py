"""Checkpoint files: written atomically, read without running code from them.

- Writes go to a temporary file beside the target, are flushed to disk, then renamed over it: a process killed
  mid-write leaves the previous checkpoint intact, and a full disk is a clear error, never a truncated file.
- Pickle-based files (`.ckpt`, `.pt`, `.pth`, `.bin`) load with `torch.load(weights_only=True)`, which only
  rebuilds tensors and plain containers. A file that needs more (arbitrary Python objects, i.e. code that
  runs on load) is refused unless the user opts in with `model.allow_pickle=true`. sdtune's own checkpoints
  hold only tensors and plain values, so they never need the opt-in.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class UntrustedFileError(ValueError):
    """A pickle file that can only be loaded by running code from it, and the user did not opt in."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. the disk is full); the previous one is untouched."""


def load_pickle_safely(
    path: Path, *, key: str, allow_pickle: bool, map_location: Any = "cpu", mmap: bool = False
) -> Any:
    """`torch.load` with `weights_only=True`; full unpickling only when `allow_pickle` (the user's opt-in).

    `key` names the setting that pointed at the file, for the error message. `mmap` maps the file instead of
    reading it (falls back to reading for legacy, non-zip files).
    """
    try:
        return _load(path, map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        if not allow_pickle:
            raise UntrustedFileError(
                f"{key}: {path} is a pickle file that holds more than tensors ({_offending_global(error)}). "
                "Loading it could run arbitrary code. Use a .safetensors version of it, or, if you trust "
                "where the file comes from, set model.allow_pickle=true."
            ) from None
    return _load(path, map_location, weights_only=False, mmap=mmap)


def _load(path: Path, map_location: Any, weights_only: bool, mmap: bool) -> Any:
    if mmap:
        try:
            return torch.load(path, map_location=map_location, weights_only=weights_only, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error) and "zip" not in str(error):
                raise
    return torch.load(path, map_location=map_location, weights_only=weights_only)


def loads_weights_only(path: Path) -> bool:
    """Whether `path` loads with `weights_only=True` (holds only tensors and plain containers)."""
    try:
        _load(path, "cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        return False
    return True


def tensors_only_copy(path: Path, cache_dir: Path) -> Path:
    """A cached `.safetensors` copy of the tensors of a trusted pickle checkpoint (unpickled in full).

    For loaders that insist on `weights_only` (diffusers' single-file loader): used only with
    `model.allow_pickle=true`.
    """
    import hashlib

    from safetensors.torch import save_file

    from sdtune.io import build_once

    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]

    def build(tmp: Path) -> None:
        loaded = torch.load(path, map_location="cpu", weights_only=False)
        while isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
            loaded = loaded["state_dict"]
        tensors = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
        save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, str(tmp))

    return build_once(cache_dir / "unpickled" / f"{path.stem}-{key}.safetensors", build)


def _offending_global(error: BaseException) -> str:
    """What the pickle asked for that weights-only loading refused, from torch's error message."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
    return f"it references {found.group(1)}" if found else str(error).splitlines()[0][:200]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O: atomic, fsync'ed writes and weights-only reads (see the module docstring)."""

    def __init__(self, allow_pickle: bool = False) -> None:
        self.allow_pickle = allow_pickle

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        write_atomically(Path(path), lambda f: torch.save(checkpoint, f))

    def load_checkpoint(
        self, path: Any, map_location: Callable | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        location = map_location if map_location is not None else "cpu"
        return load_pickle_safely(path, key="resume", allow_pickle=self.allow_pickle, map_location=location)


def write_atomically(target: Path, write: Callable[[Any], None]) -> None:
    """Call `write(file)` on a temporary sibling of `target`, fsync it, then rename it over `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            recorder = _ErrorRecordingFile(f)
            try:
                write(recorder)
            except Exception:
                # torch's zip writer replaces an OSError from write() (ENOSPC, EIO) by a vague RuntimeError
                if recorder.error is not None:
                    raise recorder.error from None
                raise
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as error:
        raise CheckpointWriteError(
            error.errno,
            f"could not write checkpoint {target}: {error.strerror or error}"
            + (" (the disk is full: free space, then resume)" if error.errno == errno.ENOSPC else "")
            + "; the previous checkpoint, if any, is untouched",
        ) from error
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(target.parent)


class _ErrorRecordingFile:
    """A write-only file wrapper that remembers the first OSError its writes raised."""

    def __init__(self, f: Any) -> None:
        self._f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._f.write(data)
        except OSError as error:
            self.error = self.error or error
            raise

    def flush(self) -> None:
        self._f.flush()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not support fsync on directories
    finally:
        os.close(fd)
