"""Export the trained weights of a module into each requested format; used at the end of training."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from sdtune.formats.diffusers import save_diffusers_lora


def _diffusers(module: Any, run_dir: Path) -> Path:
    return save_diffusers_lora(run_dir / "lora", module.unet, module.stack.text_encoder)


EXPORTERS: dict[str, Callable[[Any, Path], Path]] = {"diffusers": _diffusers}


def export_formats(module: Any, run_dir: Path, formats: list[str]) -> list[dict[str, str]]:
    """Write each format under `run_dir`; returns manifest entries (format, path relative to the run)."""
    unknown = [f for f in formats if f not in EXPORTERS]
    if unknown:
        raise ValueError(f"export.formats: unknown format(s) {unknown}; valid: {', '.join(EXPORTERS)}")
    return [
        {"format": name, "path": str(EXPORTERS[name](module, run_dir).relative_to(run_dir))}
        for name in formats
    ]
