"""sdtune: fine-tuning for latent diffusion (Stable Diffusion) models."""

import logging

__version__ = "0.1.0"

# bitsandbytes logs a warning at import on CPU-only machines about an optional kernel package; it is harmless.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
