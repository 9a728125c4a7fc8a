"""The embedded tiny SDXL stack: SDXL's architecture at small widths, built deterministically.

It has SDXL's U-Net layout (3 levels: a plain first level, then two cross-attention levels with more
transformer layers deeper down, 2 layers per block; `text_time` micro-conditioning), two CLIP text encoders
(the second wider, with GELU and a projection giving the pooled embedding), and the tiny SD VAE (8x
downsampling). So the SDXL code paths (two encoders, pooled embeddings, time ids, sgm-style kohya names, the
single-file layout) all run on it unchanged. Both tokenizers are the shipped tiny vocabulary. It is
materialised once as a diffusers pipeline folder in the cache.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from sdtune.io import build_once
from sdtune.models.tiny import MAX_TOKENS, SCHEDULER_CONFIG, TOKENIZER_DIR, VAE_CONFIG

TINY_XL_VERSION = 1
# Encoder widths differ, as in SDXL (768 / 1280): single-file loaders tell the two encoders apart by width.
TEXT_HIDDEN, TEXT_HIDDEN_2 = 32, 48  # the U-Net's cross-attention width is their sum
POOLED_DIM = 32  # text_encoder_2's projection: the pooled text embedding
TIME_EMBED_DIM = 8  # per micro-conditioning number; six of them (original, crop, target)

UNET_XL_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 32, 64],
    "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 1, 2],
    "attention_head_dim": [2, 4, 8],
    "use_linear_projection": True,
    "cross_attention_dim": TEXT_HIDDEN + TEXT_HIDDEN_2,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": TIME_EMBED_DIM,
    "projection_class_embeddings_input_dim": 6 * TIME_EMBED_DIM + POOLED_DIM,
    "norm_num_groups": 16,
}
VAE_XL_CONFIG: dict[str, Any] = {**VAE_CONFIG, "scaling_factor": 0.13025, "force_upcast": True}
TEXT_XL_CONFIG: dict[str, Any] = {
    "hidden_size": TEXT_HIDDEN,
    "intermediate_size": 4 * TEXT_HIDDEN,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": MAX_TOKENS,
    "projection_dim": POOLED_DIM,
}


def tiny_xl_key() -> str:
    """Identity of the tiny SDXL stack: changes whenever its architecture, seed or vocabulary changes."""
    blob = json.dumps(
        [TINY_XL_VERSION, UNET_XL_CONFIG, VAE_XL_CONFIG, TEXT_XL_CONFIG, TEXT_HIDDEN_2, SCHEDULER_CONFIG],
        sort_keys=True,
    )
    digest = hashlib.sha256(blob.encode())
    for name in ("vocab.json", "merges.txt"):
        digest.update((TOKENIZER_DIR / name).read_bytes())
    return digest.hexdigest()[:12]


def ensure_tiny_xl_pipeline(cache_dir: Path) -> Path:
    """The tiny SDXL stack as a diffusers folder in `cache_dir`, built once (safe across processes)."""
    return build_once(Path(cache_dir) / f"tiny-sdxl-{tiny_xl_key()}", save_tiny_xl_pipeline)


def save_tiny_xl_pipeline(out: Path) -> None:
    build_tiny_xl_pipeline().save_pretrained(out, safe_serialization=True)


def build_tiny_xl_pipeline():  # -> StableDiffusionXLPipeline (imported lazily: diffusers is slow to import)
    """Construct the tiny SDXL stack in memory, deterministically (same weights on every machine)."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tokenizer = CLIPTokenizer(
        str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"), model_max_length=MAX_TOKENS
    )
    special = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    text_config = CLIPTextConfig(**TEXT_XL_CONFIG, **special)
    wider = {"hidden_size": TEXT_HIDDEN_2, "intermediate_size": 4 * TEXT_HIDDEN_2, "hidden_act": "gelu"}
    text_config_2 = CLIPTextConfig(**{**TEXT_XL_CONFIG, **wider}, **special)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**UNET_XL_CONFIG)
        torch.manual_seed(1)
        vae = AutoencoderKL(**VAE_XL_CONFIG)
        torch.manual_seed(2)
        text_encoder = CLIPTextModel(text_config)
        torch.manual_seed(3)
        text_encoder_2 = CLIPTextModelWithProjection(text_config_2)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=DDPMScheduler(**SCHEDULER_CONFIG),
    )
