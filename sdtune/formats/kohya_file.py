"""The kohya LoRA file itself: its `ss_*` / ModelSpec header, the hashes A1111 shows, atomic save and load.

The key naming and the conversion to and from peft are in `sdtune.formats.kohya`.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path

import safetensors.torch
import torch
from safetensors import safe_open

from sdtune.io import atomic_path

UNET_PREFIX = "lora_unet_"
TE_PREFIX = "lora_te_"
SDXL_TE_PREFIXES = ("lora_te1_", "lora_te2_")
SDXL_VERSION = "sdxl_base_v1-0"
BASE_MODEL_VERSIONS = {
    "sd_v1": "stable-diffusion-v1/lora",
    "sd_v2": "stable-diffusion-v2-512/lora",
    "sd_v2_v": "stable-diffusion-v2-768-v/lora",
    SDXL_VERSION: "stable-diffusion-xl-v1-base/lora",
}
SDXL_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"
PREDICTION_TYPES = {"epsilon": "epsilon", "v": "v", "v_prediction": "v"}
LEGACY_HASH_OFFSET, LEGACY_HASH_SIZE = 0x100000, 0x10000


def kohya_metadata(
    *,
    base_model_version: str,
    v2: bool,
    rank: int,
    alpha: float,
    network_args: dict[str, str] | None,
    output_name: str,
    resolution: tuple[int, int],
    num_train_images: int,
    prediction_type: str,
    title: str,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """The kohya (`ss_*`) and ModelSpec (`modelspec.*`) header entries, all strings; `resolution` is (w, h).

    `prediction_type` is `epsilon` or `v` (`v_prediction` is accepted); `extra` entries are added last.
    """
    _check_version(base_model_version, v2, prediction_type)
    width, height = resolution
    metadata = {
        "ss_base_model_version": base_model_version,
        "ss_v2": str(bool(v2)),
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(int(rank)),
        "ss_network_alpha": str(float(alpha)),
        "ss_network_args": json.dumps(dict(network_args or {})),
        "ss_output_name": output_name,
        "ss_resolution": f"({width}, {height})",
        "ss_num_train_images": str(int(num_train_images)),
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": BASE_MODEL_VERSIONS[base_model_version],
        "modelspec.implementation": SDXL_IMPLEMENTATION
        if base_model_version == SDXL_VERSION
        else "diffusers",
        "modelspec.title": title,
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "modelspec.prediction_type": PREDICTION_TYPES[prediction_type],
    }
    metadata.update(extra or {})
    _check_metadata(metadata)
    return metadata


def _check_version(base_model_version: str, v2: bool, prediction_type: str) -> None:
    """Reject base-model versions, v2 flags and prediction types that contradict each other."""
    if base_model_version not in BASE_MODEL_VERSIONS:
        raise ValueError(
            f"base_model_version={base_model_version!r} is not one of {', '.join(BASE_MODEL_VERSIONS)}"
        )
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}")
    if v2 != base_model_version.startswith("sd_v2"):
        raise ValueError(f"v2={v2} contradicts base_model_version={base_model_version!r}")
    if v2 and (PREDICTION_TYPES[prediction_type] == "v") != (base_model_version == "sd_v2_v"):
        raise ValueError(
            f"prediction_type={prediction_type!r} contradicts base_model_version={base_model_version!r}; "
            "SD2 v-prediction models are sd_v2_v, epsilon ones sd_v2"
        )


def _check_metadata(metadata: dict[str, str]) -> None:
    """Header entries must be strings, and `lora_adapter_metadata` would make diffusers refuse the file."""
    not_str = [
        str(key) for key, value in metadata.items() if not (isinstance(key, str) and isinstance(value, str))
    ]
    if not_str:
        raise ValueError("safetensors metadata values must be str; convert: " + key_listing(not_str))
    if "lora_adapter_metadata" in metadata:
        raise ValueError(
            "lora_adapter_metadata must not be in a kohya file: diffusers rejects it with .alpha keys"
        )


def save_kohya(path: Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a kohya LoRA atomically, adding `sshs_model_hash` / `sshs_legacy_hash` computed on its bytes.

    Unlike sd-scripts, which hashes a copy serialised with only the `ss_*` entries, the legacy hash is taken
    from the file as written, so it equals what a reader computes from the file.
    """
    _check_metadata(metadata)
    stray = [key for key in state_dict if not key.startswith((UNET_PREFIX, TE_PREFIX, *SDXL_TE_PREFIXES))]
    if stray:
        raise ValueError("kohya readers reject keys outside lora_unet_/lora_te_: " + key_listing(stray))
    tensors = {key: tensor.detach().contiguous() for key, tensor in state_dict.items()}
    data = _serialise_with_hashes(tensors, metadata)
    with atomic_path(Path(path)) as tmp:
        tmp.write_bytes(data)


def _serialise_with_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """Serialise with placeholder hashes of the final length, then with the hashes of those bytes.

    The placeholders keep the header length, hence every file offset, identical in both passes.
    """
    placeholders = {"sshs_model_hash": "0" * 64, "sshs_legacy_hash": "0" * 8}
    draft = safetensors.torch.save(tensors, {**metadata, **placeholders})
    hashes = {"sshs_model_hash": _model_hash(draft)}
    if _data_offset(draft) <= LEGACY_HASH_OFFSET:  # past that the legacy window would hash the header itself
        hashes["sshs_legacy_hash"] = _legacy_hash(draft)
    data = safetensors.torch.save(tensors, {**metadata, **hashes})
    if _model_hash(data) != hashes["sshs_model_hash"] or (
        "sshs_legacy_hash" in hashes and _legacy_hash(data) != hashes["sshs_legacy_hash"]
    ):
        raise RuntimeError("safetensors wrote different bytes when only the metadata changed; cannot hash")
    return data


def _data_offset(data: bytes) -> int:
    """Offset of the tensor data: the 8-byte little-endian header length plus the header."""
    return 8 + int.from_bytes(data[:8], "little")


def _model_hash(data: bytes) -> str:
    """The addnet hash: sha256 of everything after the header."""
    return hashlib.sha256(memoryview(data)[_data_offset(data) :]).hexdigest()


def _legacy_hash(data: bytes) -> str:
    """A1111's legacy hash: first 8 hex digits of sha256 over 64 KiB at offset 1 MiB (empty if shorter)."""
    return hashlib.sha256(data[LEGACY_HASH_OFFSET : LEGACY_HASH_OFFSET + LEGACY_HASH_SIZE]).hexdigest()[:8]


def load_kohya(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a kohya LoRA file: (tensors, header metadata)."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    return tensors, metadata


def addnet_hash(path: Path) -> str:
    """The addnet hash of a safetensors file (sha256 of the bytes after the header), as A1111 shows it."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        handle.seek(8 + int.from_bytes(handle.read(8), "little"))
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def key_listing(keys: list[str], limit: int = 20) -> str:
    """Comma-separated keys, cut after `limit`."""
    shown = ", ".join(sorted(keys)[:limit])
    return shown + (f", … and {len(keys) - limit} more" if len(keys) > limit else "")
