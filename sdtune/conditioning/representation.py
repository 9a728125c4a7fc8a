"""Precomputed per-sample vectors (e.g. image or audio embeddings) → cross-attention tokens."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn


class RepresentationConditioner(nn.Module):
    """Projects `batch[key]` vectors ((B, dim), or (B, N, dim) for N vectors per sample) to `tokens` tokens
    each, of the U-Net's cross-attention width, with a small trainable projection (linear + layer norm).

    The null condition (classifier-free guidance) is all-zero tokens. The projection trains with the method's
    `text_encoder_lr` and is saved in the checkpoint and as `conditioning.safetensors` in the run directory.
    """

    slot = "crossattn"
    input = "representation"

    def __init__(
        self, stack: Any, dim: int, tokens: int = 1, dropout: float = 0.1, key: str = "representation"
    ) -> None:
        super().__init__()
        width = stack.unet.config.cross_attention_dim
        self.tokens = tokens
        self.width = width
        self.dropout = dropout
        self.key = key
        self.dim = dim
        self.proj = nn.Linear(dim, tokens * width)
        self.norm = nn.LayerNorm(width)

    def read_input(self, path: str, resolution: int) -> Tensor:
        """A (1, …, dim) batch entry from a `.npy` / `.safetensors` file (`sample representation=…`)."""
        from pathlib import Path

        from sdtune.data.representation import read_vector

        vector = read_vector(Path(path))
        if vector.ndim not in (1, 2) or vector.shape[-1] != self.dim:
            raise ValueError(
                f"vector has shape {tuple(vector.shape)}; this model takes ({self.dim},) or (N, {self.dim})"
            )
        return vector[None]

    def forward(self, batch: dict[str, Any], drop: Tensor) -> Tensor:
        vectors = batch[self.key]
        if vectors.ndim == 2:
            vectors = vectors[:, None]
        vectors = vectors.to(self.proj.weight.device, self.proj.weight.dtype)
        tokens = self.norm(self.proj(vectors).reshape(vectors.shape[0], -1, self.width))
        return tokens * (~drop).to(tokens.device, tokens.dtype)[:, None, None]
