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
PRETRAINED_DIR = Path(__file__).parent / "assets" / "tiny_pretrained"
"""Shipped weights of the tiny stack pretrained on the shapes world (README: "The pretrained tiny base")."""
WEIGHTS = ("pretrained", "random")
COMPONENTS = ("unet", "vae", "text_encoder")
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


def tiny_key(weights: str = "random") -> str:
    """Identity of the tiny stack: changes whenever its architecture, seed, vocabulary or weights change."""
    blob = json.dumps([TINY_VERSION, UNET_CONFIG, VAE_CONFIG, TEXT_CONFIG, SCHEDULER_CONFIG], sort_keys=True)
    digest = hashlib.sha256(blob.encode())
    files = [TOKENIZER_DIR / "vocab.json", TOKENIZER_DIR / "merges.txt"]
    if weights == "pretrained":
        files += pretrained_files()
    for path in files:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def pretrained_files() -> list[Path]:
    """The shipped pretrained weight files (and the VAE's scaling factor); an error if any is missing."""
    files = [PRETRAINED_DIR / f"{name}.safetensors" for name in COMPONENTS] + [PRETRAINED_DIR / "vae.json"]
    missing = [str(path) for path in files if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"the pretrained tiny stack is missing {missing}; reinstall sdtune, or use model.weights=random"
        )
    return files


def ensure_tiny_pipeline(cache_dir: Path, weights: str = "random") -> Path:
    """The tiny stack as a diffusers pipeline folder in `cache_dir`, built once (safe across processes).

    `weights`: `random` (deterministic initialisation: what pretraining starts from) or `pretrained`
    (the shipped weights trained on the shapes world).
    """
    if weights not in WEIGHTS:
        raise ValueError(f"model.weights: {weights!r} is not one of {', '.join(WEIGHTS)}")
    name = "tiny-sd" if weights == "random" else "tiny-sd-pretrained"
    return build_once(
        Path(cache_dir) / f"{name}-{tiny_key(weights)}", lambda out: save_tiny_pipeline(out, weights)
    )


def save_tiny_pipeline(out: Path, weights: str = "random") -> None:
    """Build the tiny stack and save it as a diffusers `StableDiffusionPipeline` folder."""
    pipe = build_tiny_pipeline()
    if weights == "pretrained":
        load_pretrained_weights(pipe)
    pipe.save_pretrained(out, safe_serialization=True)


def load_pretrained_weights(pipe: Any) -> None:
    """Load the shipped (fp16) weights into the float32 stack, and the VAE's latent scaling factor."""
    from safetensors.torch import load_file

    pretrained_files()
    for name in COMPONENTS:
        state = load_file(PRETRAINED_DIR / f"{name}.safetensors")
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        model = getattr(pipe, name)
        model.load_state_dict(in_model_layout(state, model), strict=True)
    vae_facts = json.loads((PRETRAINED_DIR / "vae.json").read_text())
    pipe.vae.register_to_config(scaling_factor=vae_facts["scaling_factor"])


def in_model_layout(state: dict[str, Any], model: Any) -> dict[str, Any]:
    """`state` keyed as `model` keys its weights: transformers 5.x versions differ on whether CLIPTextModel's
    keys carry the `text_model.` prefix (the shipped file has the newer, flat layout)."""
    expected = set(model.state_dict())
    if set(state) == expected:
        return state
    for old, new in (("", "text_model."), ("text_model.", "")):
        mapped = {new + k[len(old) :] if k.startswith(old) else k: v for k, v in state.items()}
        if set(mapped) == expected:
            return mapped
    return state  # the strict load names what differs


def build_tiny_pipeline():  # -> StableDiffusionPipeline (imported lazily: diffusers is slow to import)
    """Construct the tiny stack in memory with its deterministic random initialisation."""
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
