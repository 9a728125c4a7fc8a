"""sdtune: fine-tuning for latent diffusion (Stable Diffusion) models."""

__version__ = "0.1.0"
