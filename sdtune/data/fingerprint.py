"""What a run trained on: one entry per sample (content hash + caption hash), and a fingerprint of them all.

Written to `<run_dir>/dataset.json` and into checkpoints; a resume compares them with today's dataset.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

DATASET_FILE = "dataset.json"
LISTED = 5  # names shown per kind of change


def dataset_summary(names: list[str], digests: list[str], captions: list[str]) -> dict[str, Any]:
    """{"fingerprint", "num_samples", "samples": {name: "<image hash>:<caption hash>"}}."""
    samples = {
        name: f"{digest[:16]}:{hashlib.sha256(caption.encode()).hexdigest()[:8]}"
        for name, digest, caption in zip(names, digests, captions)
    }
    blob = json.dumps(sorted(samples.items()), separators=(",", ":")).encode()
    return {
        "fingerprint": hashlib.sha256(blob).hexdigest()[:16],
        "num_samples": len(samples),
        "samples": samples,
    }


def describe_change(before: dict[str, Any], now: dict[str, Any]) -> str | None:
    """None if the fingerprints match; otherwise what changed (added / removed / modified samples)."""
    if before.get("fingerprint") == now["fingerprint"]:
        return None
    head = (
        f"the dataset changed since the checkpoint was written: {before.get('num_samples', '?')} samples "
        f"then (fingerprint {before.get('fingerprint')}), {now['num_samples']} now ({now['fingerprint']})"
    )
    old, new = before.get("samples"), now["samples"]
    if old is None:
        return head
    modified = sorted(k for k in old.keys() & new.keys() if old[k] != new[k])
    parts = [
        _listed("added", sorted(new.keys() - old.keys())),
        _listed("removed", sorted(old.keys() - new.keys())),
        _listed("modified (image or caption)", modified),
    ]
    return head + "; " + "; ".join(p for p in parts if p)


def _listed(kind: str, names: list[str]) -> str:
    if not names:
        return ""
    shown = ", ".join(names[:LISTED]) + (f", … (+{len(names) - LISTED})" if len(names) > LISTED else "")
    return f"{len(names)} {kind}: {shown}"


def load_summary(run_dir: Path) -> dict[str, Any] | None:
    """The dataset summary a run directory recorded, if any."""
    path = run_dir / DATASET_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
