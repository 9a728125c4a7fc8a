"""The embedded tiny stack: SD1.5's architecture at small widths, built deterministically.

It has SD1.5's block layout (4 U-Net levels, 3 cross-attention down blocks, 2 layers per block; a 4-level VAE
with 8x downsampling), so every conversion written for the real model (single-file layout, kohya key names)
runs on it unchanged. It is materialised once as a real diffusers pipeline folder in the cache.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from sdtune.io import build_once

TOKENIZER_DIR = Path(__file__).parent / "assets" / "tokenizer"
TINY_VERSION = 1
MAX_TOKENS = 77

UNET_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 32, 64, 64],
    "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "cross_attention_dim": 64,
    "attention_head_dim": 4,
    "norm_num_groups": 16,
}
VAE_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [16, 32, 64, 64],
    "layers_per_block": 2,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "norm_num_groups": 16,
    "scaling_factor": 0.18215,
}
TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": MAX_TOKENS,
    "projection_dim": 64,
}
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "steps_offset": 1,
}


def tiny_key() -> str:
    """Identity of the tiny stack: changes whenever its architecture, seed or vocabulary changes."""
    blob = json.dumps([TINY_VERSION, UNET_CONFIG, VAE_CONFIG, TEXT_CONFIG, SCHEDULER_CONFIG], sort_keys=True)
    digest = hashlib.sha256(blob.encode())
    for name in ("vocab.json", "merges.txt"):
        digest.update((TOKENIZER_DIR / name).read_bytes())
    return digest.hexdigest()[:12]


def ensure_tiny_pipeline(cache_dir: Path) -> Path:
    """The tiny stack as a diffusers pipeline folder in `cache_dir`, built once (safe across processes)."""
    return build_once(Path(cache_dir) / f"tiny-sd-{tiny_key()}", save_tiny_pipeline)


def save_tiny_pipeline(out: Path) -> None:
    """Build the tiny stack with fixed seeds and save it as a diffusers `StableDiffusionPipeline` folder."""
    build_tiny_pipeline().save_pretrained(out, safe_serialization=True)


def build_tiny_pipeline():  # -> StableDiffusionPipeline (imported lazily: diffusers is slow to import)
    """Construct the tiny stack in memory, deterministically (same weights on every machine)."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer(
        str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"), model_max_length=MAX_TOKENS
    )
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**UNET_CONFIG)
        torch.manual_seed(1)
        vae = AutoencoderKL(**VAE_CONFIG)
        torch.manual_seed(2)
        text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), **TEXT_CONFIG, **special))
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDPMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
