"""Resuming a run: checking the checkpoint before anything loads, and what changed since it was written."""

from __future__ import annotations

import logging
import shlex
from pathlib import Path
from typing import Any

from sdtune.checkpoint import load_pickle_safely
from sdtune.data.fingerprint import describe_change, load_summary

log = logging.getLogger(__name__)


def read_checkpoint(path: Path, allow_pickle: bool) -> dict[str, Any]:
    """The checkpoint at `path`, loaded weights-only and memory-mapped; refuses untrusted pickles."""
    return load_pickle_safely(path, key="resume", allow_pickle=allow_pickle, mmap=True)


def dataset_change(checkpoint_path: Path, checkpoint: dict[str, Any], datamodule: Any) -> str | None:
    """What changed in the dataset since `checkpoint` was written, logged as a warning (None: no change).

    The run directory's `dataset.json` names each added, removed or modified sample; a checkpoint moved out
    of its run directory still carries the fingerprint.
    """
    now = getattr(datamodule, "summary", None)
    if now is None:
        return None
    before = None
    if checkpoint_path.parent.name == "checkpoints":
        before = load_summary(checkpoint_path.parent.parent)
    if before is None:
        before = (checkpoint.get(type(datamodule).__qualname__) or {}).get("dataset")
    change = describe_change(before, now) if before else None
    if change:
        log.warning("resume=%s: %s", checkpoint_path, change)
    return change


def resume_command(run_dir: Path, overrides: list[str]) -> str:
    """The command line that continues `run_dir` with the same overrides."""
    kept = [o for o in overrides if not o.startswith(("resume=", "hydra.run.dir="))]
    return " ".join(["python -m sdtune.train", *map(shlex.quote, kept), shlex.quote(f"resume={run_dir}")])
