"""Text conditioning: CLIP tokens → hidden states, fed to the U-Net by cross-attention.

SDXL (a stack with `text_encoder_2`): the penultimate hidden states of both encoders, concatenated, feed
cross-attention; the second encoder's pooled (projected) embedding and the micro-conditioning time ids
(original size, crop top-left, target size: `time_ids`) go to the U-Net's `added_cond_kwargs`.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor, nn

from sdtune.config import ConfigError


class TextConditioner(nn.Module):
    """Encodes `batch[key]` captions with the stack's tokenizer and text encoder.

    The null condition (classifier-free guidance) is the empty caption, or `batch["negative_<key>"]`.
    With the text cache on (`sdtune.data.cache`) the batch carries `<key>_embeds` and
    `negative_<key>_embeds` (the empty caption's) instead, and the encoder does not run.
    For SDXL it returns (tokens, {"text_embeds": pooled, "time_ids": …}); dropped samples get the null
    caption's tokens and pooled embedding, but keep their time ids. Cached, the pooled embeddings come as
    `<key>_pooled` and `negative_<key>_pooled`.

    `clip_skip` is A1111's and kohya's "clip skip": 1 = the last layer's hidden states, 2 = the penultimate
    layer's, each through the encoder's final layer norm (diffusers' `clip_skip` counts from 0: its 1 is
    this 2). SDXL always uses the penultimate layers, as its pipeline does.

    `max_token_length` (kohya's option: 75, 150 or 225) reads that many caption tokens instead of 75: the
    tokens are cut into chunks of 75, each encoded between its own BOS and EOS, and the chunks' hidden states
    joined (the first BOS, every chunk's 75, the last EOS), as sd-scripts does. SDXL: 75 only.
    """

    slot = "crossattn"

    def __init__(
        self,
        stack: Any,
        dropout: float = 0.1,
        key: str = "caption",
        clip_skip: int = 1,
        max_token_length: int = 75,
    ) -> None:
        super().__init__()
        layers = stack.text_encoder.config.num_hidden_layers
        sdxl = getattr(stack, "text_encoder_2", None) is not None
        if sdxl and (clip_skip, max_token_length) != (1, 75):
            raise ConfigError(
                [
                    "conditioning.text: SDXL reads penultimate layers of 75 tokens; leave clip_skip=1 and "
                    "max_token_length=75"
                ]
            )
        if max_token_length not in MAX_TOKEN_LENGTHS:
            raise ConfigError(
                [f"conditioning.text.max_token_length: got {max_token_length!r}; use 75, 150 or 225"]
            )
        self.max_token_length = max_token_length
        if not 1 <= clip_skip <= layers:
            raise ConfigError(
                [
                    f"conditioning.text.clip_skip: got {clip_skip}, but the text encoder has {layers} "
                    f"layers; use 1 (the last layer) to {layers}"
                ]
            )
        self.clip_skip = clip_skip
        self.tokenizer = stack.tokenizer
        self.text_encoder = stack.text_encoder
        self.tokenizer_2 = getattr(stack, "tokenizer_2", None)
        self.text_encoder_2 = getattr(stack, "text_encoder_2", None)
        self.rewrites = stack.caption_rewrites
        self.dropout = dropout
        self.key = key
        self.output_device: torch.device | None = None  # set when the encoder is kept off the accelerator

    def forward(self, batch: dict[str, Any], drop: Tensor) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        if self.text_encoder_2 is not None:
            if f"{self.key}_embeds" in batch:
                tokens, pooled = (self._cached(batch, drop, part) for part in ("embeds", "pooled"))
            else:
                tokens, pooled = self.encode_xl(self.chosen_captions(batch, drop))
            return tokens, {"text_embeds": pooled, "time_ids": time_ids(batch).to(tokens.device)}
        if f"{self.key}_embeds" in batch:
            return self._cached(batch, drop, "embeds")
        return self.encode(self.chosen_captions(batch, drop))

    def _cached(self, batch: dict[str, Any], drop: Tensor, part: str) -> Tensor:
        """The cached `<key>_<part>` of each sample, or the null caption's where `drop` is set."""
        cached, null = batch[f"{self.key}_{part}"], batch[f"negative_{self.key}_{part}"]
        mask = drop.to(cached.device).reshape(-1, *[1] * (cached.dim() - 1))
        return torch.where(mask, null, cached)

    @property
    def encoders(self) -> list[Any]:
        """The text encoders this component runs: one, or SDXL's two."""
        return [e for e in (self.text_encoder, self.text_encoder_2) if e is not None]

    @property
    def chunks(self) -> int:
        """How many runs of 75 tokens a caption is read in."""
        return self.max_token_length // 75

    def token_ids(self, captions: list[str]) -> Tensor:
        """Each tokenizer's ids of `captions`, side by side (what the text cache is keyed by)."""
        tokenizers = [self.tokenizer] + ([self.tokenizer_2] if self.text_encoder_2 is not None else [])
        return torch.cat([_token_ids(tokenizer, captions, self.chunks) for tokenizer in tokenizers], dim=1)

    def chosen_captions(self, batch: dict[str, Any], drop: Tensor) -> list[str]:
        """Each sample's caption, or its null caption (negative or empty) where `drop` is set."""
        captions = list(batch[self.key])
        negatives = batch.get(f"negative_{self.key}") or [""] * len(captions)
        return [neg if dropped else cap for cap, neg, dropped in zip(captions, negatives, drop.tolist())]

    def encode(self, captions: list[str]) -> Tensor:
        hidden = self.hidden_states(_token_ids(self.tokenizer, self._rewritten(captions), self.chunks))
        return hidden if self.output_device is None else hidden.to(self.output_device)

    def hidden_states(self, ids: Tensor) -> Tensor:
        """The hidden states that condition the U-Net: the `clip_skip`-th layer from the end, normalised;
        chunked ids (`max_token_length` > 75) are encoded chunk by chunk and joined."""
        if self.chunks == 1:
            return self._layer(ids)
        batch, length = ids.shape[0], self.tokenizer.model_max_length
        hidden = self._layer(ids.reshape(batch * self.chunks, length))
        hidden = hidden.reshape(batch, self.chunks, length, hidden.shape[-1])
        body = hidden[:, :, 1:-1].reshape(batch, self.chunks * (length - 2), hidden.shape[-1])
        return torch.cat([hidden[:, 0, :1], body, hidden[:, -1, -1:]], dim=1)

    def _layer(self, ids: Tensor) -> Tensor:
        encoder = self.text_encoder
        if self.clip_skip == 1:
            return encoder(ids.to(encoder.device))[0]
        output = encoder(ids.to(encoder.device), output_hidden_states=True)
        # transformers 5 moved CLIPTextModel's layers out of `text_model`.
        final_norm = getattr(encoder, "text_model", encoder).final_layer_norm
        return final_norm(output.hidden_states[-self.clip_skip])

    def encode_xl(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """SDXL: (both encoders' penultimate hidden states concatenated, encoder 2's pooled embedding).

        The same maths as `StableDiffusionXLPipeline.encode_prompt`, but with gradients (text-encoder LoRA).
        """
        return self.encode_xl_ids(self.token_ids(self._rewritten(captions)))

    def encode_xl_ids(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """`encode_xl` of `token_ids` output."""
        hidden, pooled = [], None
        parts = ids.split(self.tokenizer.model_max_length, dim=1)
        for part, encoder in zip(parts, (self.text_encoder, self.text_encoder_2), strict=True):
            output = encoder(part.to(encoder.device), output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
            pooled = output[0]  # encoder 2 (with projection): text_embeds
        tokens = torch.cat(hidden, dim=-1)
        if self.output_device is not None:
            return tokens.to(self.output_device), pooled.to(self.output_device)
        return tokens, pooled

    def _rewritten(self, captions: list[str]) -> list[str]:
        for pattern, replacement in self.rewrites.items():
            captions = [re.sub(pattern, replacement, c) for c in captions]
        return captions


MICRO_CONDITIONING = ("original_size", "crop_top_left", "target_size")  # each (B, 2): (h, w) / (top, left)


def time_ids(batch: dict[str, Any]) -> Tensor:
    """SDXL's `add_time_ids` (B, 6): original (h, w), crop (top, left), target (h, w) of each sample."""
    return torch.cat([torch.as_tensor(batch[key]).reshape(-1, 2) for key in MICRO_CONDITIONING], 1).float()


def with_micro_conditioning(batch: dict[str, Any], size: int, height: int, width: int) -> dict[str, Any]:
    """`batch` (of `size` samples) with the micro-conditioning it lacks, as for an uncropped height × width.

    That is what `StableDiffusionXLPipeline` uses when sampling; data that records its resize and crop
    (`sdtune.data.transforms`, `sdtune.data.buckets`) brings its own values.
    """
    missing = [key for key in MICRO_CONDITIONING if key not in batch]
    if not missing:
        return batch
    defaults = {"original_size": (height, width), "crop_top_left": (0, 0), "target_size": (height, width)}
    return {**batch, **{key: torch.tensor([defaults[key]] * size) for key in missing}}


MAX_TOKEN_LENGTHS = (75, 150, 225)


def _token_ids(tokenizer: Any, captions: list[str], chunks: int = 1) -> Tensor:
    """(B, chunks × 77) ids: `chunks` × 75 caption tokens, each run of 75 between BOS and EOS."""
    length = tokenizer.model_max_length
    ids = tokenizer(
        captions,
        padding="max_length",
        max_length=(length - 2) * chunks + 2,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    if chunks == 1:
        return ids
    body = ids[:, 1:-1].reshape(len(captions), chunks, length - 2)
    ends = [
        torch.full((len(captions), chunks, 1), t, dtype=ids.dtype)
        for t in (tokenizer.bos_token_id, tokenizer.eos_token_id)
    ]
    return torch.cat([ends[0], body, ends[1]], dim=2).reshape(len(captions), chunks * length)
