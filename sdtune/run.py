"""The run directory: refusing to reuse another run's, exporting at the end, and the manifest."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
from pathlib import Path
from typing import Any

from pytorch_lightning.utilities import rank_zero_only

import sdtune
from sdtune.data.fingerprint import DATASET_FILE
from sdtune.io import atomic_write_json
from sdtune.redact import redact

MANIFEST = "manifest.json"
SKIPPED_SAMPLES = "skipped_samples.json"


class RunDirError(RuntimeError):
    """The run directory already holds another run."""


def ensure_fresh_run_dir(run_dir: Path) -> None:
    """Refuse a run directory that already holds a run's checkpoints or manifest.

    A requeued SLURM job (same job id, same run directory; see `slurm_restart_count`) is the same run: its
    directory is accepted, and `requeue_checkpoint` says where it resumes from.
    """
    taken = [name for name in ("checkpoints", MANIFEST) if (run_dir / name).exists()]
    if taken and slurm_restart_count() == 0:
        raise RunDirError(
            f"run directory {run_dir} already holds a run ({', '.join(taken)}); choose a new hydra.run.dir, "
            f"or continue that run with resume={run_dir} (outputs then go to a new directory)"
        )


def slurm_restart_count() -> int:
    """How many times SLURM has requeued this job (SLURM_RESTART_COUNT); 0 outside SLURM."""
    if not os.environ.get("SLURM_JOB_ID"):
        return 0
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0)


def requeue_checkpoint(run_dir: Path) -> Path | None:
    """In a requeued SLURM job: the newest checkpoint an earlier attempt left in `run_dir`, else None.

    Candidates are `hpc_ckpt_<n>.ckpt` (saved on SIGUSR1 by `sdtune.callbacks.requeue.SlurmRequeue`, or by
    Lightning) and `checkpoints/last.ckpt` (the periodic checkpoint, e.g. after a node failure).
    """
    if slurm_restart_count() == 0:
        return None
    candidates = [*run_dir.glob("hpc_ckpt_*.ckpt"), run_dir / "checkpoints" / "last.ckpt"]
    existing = [p for p in candidates if p.is_file()]
    return max(existing, key=lambda p: p.stat().st_mtime) if existing else None


def git_commit() -> str | None:
    """The commit of the sdtune source tree, if it is a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(sdtune.__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def write_manifest(
    run_dir: Path,
    *,
    base_model: str,
    global_step: int,
    world_size: int,
    method: str,
    exports: list[dict[str, str]],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write `manifest.json`: what the run produced and what it applies to."""
    manifest = {
        "sdtune_version": sdtune.__version__,
        "git_commit": git_commit(),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "base_model": base_model,
        "method": method,
        "global_step": global_step,
        "world_size": world_size,
        "exports": exports,
        **(extra or {}),
    }
    path = run_dir / MANIFEST
    atomic_write_json(path, redact(manifest))
    return path


@rank_zero_only
def record_data(run_dir: Path, datamodule: Any) -> None:
    """Write what the run trains on (`dataset.json`) and the bad samples it skips (`skipped_samples.json`)."""
    summary = getattr(datamodule, "summary", None)
    if summary is not None:
        atomic_write_json(run_dir / DATASET_FILE, summary)
    if datamodule.skipped:
        skipped = [{"sample": name, "reason": reason} for name, reason in datamodule.skipped]
        atomic_write_json(run_dir / SKIPPED_SAMPLES, skipped)


def unreadable_run(source: str, name: str, error: Exception) -> str:
    """The problem line for a run file (manifest, saved config) that no longer parses."""
    return (
        f"source: the run {source!r} has an unreadable {name} ({type(error).__name__}: {error}); "
        "sdtune.train writes it: restore it from a backup"
    )
