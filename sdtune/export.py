"""`python -m sdtune.export source=<run dir or checkpoint> format=<name> out=<path>`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from sdtune.config import ConfigError, check_export_dtype, require_given
from sdtune.config_types import require_flag
from sdtune.formats.exporters import EXPORTERS, ExportError
from sdtune.run import MANIFEST


def locate(source: str) -> tuple[Path, Path]:
    """(run directory, checkpoint) for a run directory or a checkpoint inside one's `checkpoints/`."""
    path = Path(source).expanduser().resolve()
    if path.is_dir():
        return path, path / "checkpoints" / "last.ckpt"
    return path.parent.parent, path


def check(cfg: DictConfig) -> tuple[Path, Path]:
    """Every problem with the request at once, before any model loads."""
    require_given(cfg)
    problems: list[str] = []
    require_flag(problems.append, "overwrite", cfg.overwrite)
    check_export_dtype("dtype", cfg.get("dtype"), problems.append)
    run_dir, checkpoint = locate(str(cfg.source))
    if not checkpoint.is_file():
        problems.append(f"source: no checkpoint at {checkpoint}; give a run directory or a checkpoint file")
    elif not (run_dir / ".hydra" / "config.yaml").is_file():
        problems.append(
            f"source: {run_dir} has no .hydra/config.yaml; give a checkpoint inside an sdtune run"
        )
    if cfg.format not in EXPORTERS:
        problems.append(f"format: unknown format {cfg.format!r}; valid: {', '.join(EXPORTERS)}")
    if Path(cfg.out).exists() and not cfg.overwrite:
        problems.append(f"out: {cfg.out} already exists; pass overwrite=true to replace it, or another out")
    if problems:
        raise ConfigError(problems)
    return run_dir, checkpoint


def restore(run_dir: Path, checkpoint: Path, cache_dir: Path) -> tuple[Any, DictConfig]:
    """Rebuild the trained module of a run: its base model, its method, the checkpoint's trained weights."""
    from sdtune.conditioning import build_conditioning
    from sdtune.models import load_stack
    from sdtune.models.adapters import apply_method
    from sdtune.module import DiffusionModule

    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    with open_dict(cfg):
        cfg.method.init_from = None  # the checkpoint holds the trained weights already
    stack = load_stack(cfg.model, cache_dir)
    apply_method(stack, cfg.method)
    module = DiffusionModule(stack, build_conditioning(cfg.conditioning, stack), cfg.method, cfg.loss)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    missing = sorted(set(module.trainable_parameters()) - set(state))
    if missing:
        raise ConfigError(
            [
                f"source: checkpoint {checkpoint} lacks trained weights such as {missing[0]!r}; "
                "was it written by a run with a different method or base model?"
            ]
        )
    module.load_state_dict(state, strict=False)
    return module.eval(), cfg


def export(cfg: DictConfig) -> Path:
    """Write the run's weights in `cfg.format` to `cfg.out`."""
    from sdtune.formats.exporters import context_from_module
    from sdtune.formats.training_metadata import training_metadata

    run_dir, checkpoint = check(cfg)
    module, run_cfg = restore(run_dir, checkpoint, Path(cfg.cache_dir))
    manifest_path = run_dir / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    ctx = context_from_module(
        module,
        name=cfg.name or run_dir.name,
        resolution=run_cfg.data.resolution,
        num_train_images=manifest.get("num_train_images", 0),
        dtype=cfg.get("dtype"),
        training=training_metadata(run_cfg, manifest.get("global_step")),
    )
    return EXPORTERS[cfg.format](ctx, Path(cfg.out))


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    try:
        out = export(cfg)
    except (ConfigError, ExportError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    print(out)


if __name__ == "__main__":
    main()
