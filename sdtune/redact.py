"""Keeping secrets (W&B key, hub tokens, …) out of what a run writes: config, manifest, logs, metadata."""

from __future__ import annotations

import os
import re
from typing import Any

# Environment variables whose values are secrets, by name; values shorter than this are not worth matching.
SECRET_NAME = re.compile(r"(API_?KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?)$", re.IGNORECASE)
SECRET_KEY = re.compile(r"(api_?key|token|secret|password|passwd|credentials?)$", re.IGNORECASE)
MIN_SECRET_LENGTH = 8
REDACTED = "***"


def secret_values() -> list[str]:
    """Values of the secret-looking environment variables (WANDB_API_KEY, HF_TOKEN, …), longest first."""
    values = {v for k, v in os.environ.items() if SECRET_NAME.search(k) and len(v) >= MIN_SECRET_LENGTH}
    return sorted(values, key=len, reverse=True)


def redact(value: Any, secrets: list[str] | None = None) -> Any:
    """`value` (nested dicts/lists/strings) with secret values and secret-named keys' values replaced."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(value, dict):
        return {
            k: REDACTED if isinstance(k, str) and SECRET_KEY.search(k) and v else redact(v, secrets)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v, secrets) for v in value)
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, REDACTED)
    return value
