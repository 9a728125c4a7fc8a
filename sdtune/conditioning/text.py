"""Text conditioning: CLIP tokens → hidden states, fed to the U-Net by cross-attention."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor, nn


class TextConditioner(nn.Module):
    """Encodes `batch[key]` captions with the stack's tokenizer and text encoder.

    The null condition (classifier-free guidance) is the empty caption, or `batch["negative_<key>"]`.
    With the text cache on (`sdtune.data.cache`) the batch carries `<key>_embeds` and
    `negative_<key>_embeds` (the empty caption's) instead, and the encoder does not run.
    """

    slot = "crossattn"

    def __init__(self, stack: Any, dropout: float = 0.1, key: str = "caption") -> None:
        super().__init__()
        self.tokenizer = stack.tokenizer
        self.text_encoder = stack.text_encoder
        self.rewrites = stack.caption_rewrites
        self.dropout = dropout
        self.key = key
        self.output_device: torch.device | None = None  # set when the encoder is kept off the accelerator

    def forward(self, batch: dict[str, Any], drop: Tensor) -> Tensor:
        cached = batch.get(f"{self.key}_embeds")
        if cached is not None:
            null = batch[f"negative_{self.key}_embeds"]
            return torch.where(drop.to(cached.device)[:, None, None], null, cached)
        captions = list(batch[self.key])
        negatives = batch.get(f"negative_{self.key}") or [""] * len(captions)
        chosen = [neg if dropped else cap for cap, neg, dropped in zip(captions, negatives, drop.tolist())]
        return self.encode(chosen)

    def encode(self, captions: list[str]) -> Tensor:
        for pattern, replacement in self.rewrites.items():
            captions = [re.sub(pattern, replacement, c) for c in captions]
        ids = self.tokenizer(
            captions,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        hidden = self.text_encoder(ids.to(self.text_encoder.device))[0]
        return hidden if self.output_device is None else hidden.to(self.output_device)
