"""`python -m sdtune.export source=<run dir or checkpoint> format=<name> out=<path>`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
import yaml
from omegaconf import DictConfig, OmegaConf, open_dict

from sdtune.config import ConfigError, check_export_dtype, require_given
from sdtune.config_types import require_flag
from sdtune.formats.exporters import (
    CONDITIONING_WEIGHTS,
    EXPORTERS,
    ExportError,
    conditioning_weights,
    save_conditioning,
)
from sdtune.run import MANIFEST, unreadable_run


def locate(source: str) -> tuple[Path, Path]:
    """(run directory, checkpoint) for a run directory or a checkpoint inside one's `checkpoints/`."""
    path = Path(source).expanduser().resolve()
    if path.is_dir():
        return path, path / "checkpoints" / "last.ckpt"
    return path.parent.parent, path


def unreadable_run_files(run_dir: Path) -> list[str]:
    """The run's config and manifest (when it has one) must parse: restoring and labelling need them."""
    problems = []
    try:
        OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    except (OSError, yaml.YAMLError) as error:
        problems.append(unreadable_run(str(run_dir), ".hydra/config.yaml", error))
    manifest = run_dir / MANIFEST
    if manifest.is_file():
        try:
            if not isinstance(json.loads(manifest.read_text(encoding="utf-8")), dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as error:
            problems.append(unreadable_run(str(run_dir), MANIFEST, error))
    return problems


def check(cfg: DictConfig) -> tuple[Path, Path]:
    """Every problem with the request at once, before any model loads."""
    require_given(cfg)
    problems: list[str] = []
    require_flag(problems.append, "overwrite", cfg.overwrite)
    require_flag(problems.append, "ema", cfg.get("ema", True))
    check_export_dtype("dtype", cfg.get("dtype"), problems.append)
    run_dir, checkpoint = locate(str(cfg.source))
    if not checkpoint.is_file():
        problems.append(f"source: no checkpoint at {checkpoint}; give a run directory or a checkpoint file")
    elif not (run_dir / ".hydra" / "config.yaml").is_file():
        problems.append(
            f"source: {run_dir} has no .hydra/config.yaml; give a checkpoint inside an sdtune run"
        )
    else:
        problems.extend(unreadable_run_files(run_dir))
    if cfg.format not in EXPORTERS:
        problems.append(f"format: unknown format {cfg.format!r}; valid: {', '.join(EXPORTERS)}")
    if Path(cfg.out).exists() and not cfg.overwrite:
        problems.append(f"out: {cfg.out} already exists; pass overwrite=true to replace it, or another out")
    beside = conditioning_path(Path(cfg.out))
    if beside.parent != Path(cfg.out) and beside.exists() and not cfg.overwrite:
        problems.append(
            f"out: {beside} (where a trained conditioning goes) already exists; pass overwrite=true"
        )
    if problems:
        raise ConfigError(problems)
    return run_dir, checkpoint


def conditioning_path(out: Path) -> Path:
    """Where the run's own conditioning weights go beside an export: inside a folder, next to a file."""
    if out.suffix == ".safetensors":
        return out.with_name(f"{out.stem}.{CONDITIONING_WEIGHTS}")
    return out / CONDITIONING_WEIGHTS


def restore(
    run_dir: Path, checkpoint: Path, cache_dir: Path, ema: bool = False
) -> tuple[Any, DictConfig, bool]:
    """Rebuild the trained module of a run: its base model, its method, the checkpoint's trained weights
    (with `ema`, their average where the checkpoint keeps one). The flag says whether the average went in."""
    from sdtune.conditioning import build_conditioning
    from sdtune.models import load_stack
    from sdtune.models.adapters import apply_method, apply_noise_schedule
    from sdtune.module import DiffusionModule

    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    with open_dict(cfg):
        cfg.method.init_from = None  # the checkpoint holds the trained weights already
    stack = load_stack(cfg.model, cache_dir)
    apply_method(stack, cfg.method)
    apply_noise_schedule(stack, cfg.method, cfg.loss)
    module = DiffusionModule(stack, build_conditioning(cfg.conditioning, stack), cfg.method, cfg.loss)
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = saved["state_dict"]
    missing = sorted(set(module.trainable_parameters()) - set(state))
    if missing:
        raise ConfigError(
            [
                f"source: checkpoint {checkpoint} lacks trained weights such as {missing[0]!r}; "
                "was it written by a run with a different method or base model?"
            ]
        )
    module.load_state_dict(state, strict=False)
    average = checkpoint_ema(saved) if ema else None
    if average is not None:
        load_average(module, average, checkpoint)
    return module.eval(), cfg, average is not None


def checkpoint_ema(saved: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """The EMA callback's averaged weights in a Lightning checkpoint, by parameter name; None without one."""
    for state in saved.get("callbacks", {}).values():
        if isinstance(state, dict) and isinstance(state.get("shadow"), dict):
            return state["shadow"]
    return None


def load_average(module: Any, average: dict[str, torch.Tensor], checkpoint: Path) -> None:
    params = dict(module.named_parameters())
    unknown = sorted(set(average) - set(params))
    if unknown:
        raise ConfigError(
            [
                f"source: the EMA in {checkpoint} holds weights this run's model lacks, such as "
                f"{unknown[0]!r}; pass ema=false to export the trained weights"
            ]
        )
    with torch.no_grad():
        for name, tensor in average.items():
            params[name].copy_(tensor.to(params[name].dtype))


def export(cfg: DictConfig) -> Path:
    """Write the run's weights in `cfg.format` to `cfg.out`."""
    from sdtune.formats.exporters import context_from_module
    from sdtune.formats.training_metadata import training_metadata

    run_dir, checkpoint = check(cfg)
    module, run_cfg, averaged = restore(run_dir, checkpoint, Path(cfg.cache_dir), ema=cfg.get("ema", True))
    if averaged:
        print(
            f"exporting the EMA weights of {checkpoint.name} (ema=false: the trained ones)", file=sys.stderr
        )
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
    written = EXPORTERS[cfg.format](ctx, Path(cfg.out))
    # e.g. a representation projection: no model format holds it, and the export is useless without it
    own = conditioning_weights(ctx) if ctx.conditioning is not None else {}
    if own:
        beside = save_conditioning(own, conditioning_path(written))
        print(f"the trained conditioning weights went to {beside}", file=sys.stderr)
    return written


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
