"""Loading the latent-diffusion stack: the embedded tiny model, hub ids, local folders, single files."""

from sdtune.models.loading import Stack, load_stack

__all__ = ["Stack", "load_stack"]
