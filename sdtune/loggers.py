"""Experiment loggers; W&B goes offline by itself when no API key is configured, and never hangs."""

from __future__ import annotations

import os
import re
from pathlib import Path

from pytorch_lightning.loggers import WandbLogger


def wandb_mode(requested: str | None) -> str:
    """`requested`, else WANDB_MODE, else online with an API key and offline without one."""
    if requested:
        return requested
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY") or _netrc_has_wandb():
        return "online"
    return "offline"


def _netrc_has_wandb() -> bool:
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def wandb_logger(
    save_dir: str,
    project: str = "sdtune",
    name: str | None = None,
    group: str | None = None,
    tags: list[str] | None = None,
    mode: str | None = None,
) -> WandbLogger:
    """A WandbLogger writing under `save_dir/wandb`; a requeued SLURM job continues its earlier W&B run."""
    from sdtune.run import slurm_restart_count

    resolved = wandb_mode(mode)
    run_id = previous_wandb_run(Path(save_dir)) if slurm_restart_count() else None
    os.environ.setdefault("WANDB_DIR", save_dir)  # forked DDP ranks otherwise write to ./wandb
    os.environ.setdefault("WANDB_SILENT", "true")
    return WandbLogger(
        save_dir=save_dir,
        project=project,
        name=name,
        group=group,
        tags=list(tags or []),
        offline=resolved == "offline",
        mode=resolved,
        settings={"init_timeout": 60},
        id=run_id,
        resume="allow" if run_id else None,
    )


_RUN_DIR = re.compile(r"(?:offline-)?run-\d{8}_\d{6}-([a-z0-9]+)")


def previous_wandb_run(save_dir: Path) -> str | None:
    """The id of the newest W&B run under `save_dir/wandb`, if any."""
    runs = [p for p in (save_dir / "wandb").glob("*run-*") if p.is_dir() and _RUN_DIR.fullmatch(p.name)]
    if not runs:
        return None
    return _RUN_DIR.fullmatch(max(runs, key=lambda p: p.stat().st_mtime).name).group(1)
