"""The benchmark's workloads: named model / resolution / batch / rank settings, and the models and data they
train on — the real SD1.5 and SDXL architectures with random weights (the same compute, nothing downloaded),
a mid-size CPU model, and the embedded tiny stack. `sdtune.benchmark` runs them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdtune.models.tiny import SCHEDULER_CONFIG

TFLOP_PER_IMAGE_SD15_512 = 1.61  # U-Net forward + backward per 512² image (the anchor)
HOPPER_BF16_DENSE_TFLOPS = 989.4  # H100 and H200 SXM: the same chip, the same dense bf16 peak

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # train_text_to_image_lora.py's targets
SD_SCHEDULER = SCHEDULER_CONFIG  # the embedded tiny stack uses SD's training schedule too


def _sd_unet(sample_size: int, channels: list[int], cross_attention_dim: int) -> dict[str, Any]:
    """SD1.5's U-Net layout (three cross-attention levels, two layers each) at the given widths."""
    return {
        "sample_size": sample_size,
        "block_out_channels": channels,
        "layers_per_block": 2,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "cross_attention_dim": cross_attention_dim,
        "attention_head_dim": 8,
    }


def _sd_vae(sample_size: int, channels: list[int]) -> dict[str, Any]:
    """SD's 8x-downsampling KL autoencoder at the given widths."""
    return {
        "sample_size": sample_size,
        "block_out_channels": channels,
        "layers_per_block": 2,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "latent_channels": 4,
        "scaling_factor": 0.18215,
    }


def _clip_text(width: int, layers: int, heads: int, **extra: Any) -> dict[str, Any]:
    """A CLIP text-encoder config of CLIP's proportions (MLP 4× the width, projection = width)."""
    return {
        "hidden_size": width,
        "intermediate_size": 4 * width,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "projection_dim": width,
        **extra,
    }


ARCHITECTURES: dict[str, dict[str, Any]] = {
    # An SD-architecture model with a 35 M-parameter U-Net for 128 px (SD1.5's layout at 1/5 width).
    "mid": {
        "unet": _sd_unet(16, [64, 128, 256, 256], 256),
        "vae": _sd_vae(128, [32, 64, 128, 128]),
        "text": _clip_text(256, layers=4, heads=4),
    },
    # Stable Diffusion 1.5 exactly (860 M U-Net, 84 M VAE, CLIP ViT-L/14 text encoder), random weights.
    "sd15": {
        "unet": _sd_unet(64, [320, 640, 1280, 1280], 768),
        "vae": _sd_vae(512, [128, 256, 512, 512]),
        "text": _clip_text(768, layers=12, heads=12, hidden_act="quick_gelu", vocab_size=49408),
    },
}


SDXL_UNSUPPORTED = (
    "the benchmark has no SDXL sides yet (sdtune trains SDXL; the plain and unet_only loops are SD1/SD2)"
)


@dataclass
class Workload:
    name: str
    model: str  # "tiny" or a key of ARCHITECTURES
    resolution: int
    batch_size: int
    rank: int
    gpu: bool
    num_workers: int = 0  # data-loader workers, both sides (a GPU step is short enough to wait on data)
    unsupported: str | None = None


WORKLOADS = {
    "tiny-cpu": Workload("tiny-cpu", "tiny", 64, 8, 4, gpu=False),
    "mid-cpu": Workload("mid-cpu", "mid", 128, 4, 4, gpu=False),
    "sd15-lora-512": Workload("sd15-lora-512", "sd15", 512, 8, 16, gpu=True, num_workers=4),
    "sdxl-lora-1024": Workload("sdxl-lora-1024", "sdxl", 1024, 4, 16, gpu=True, unsupported=SDXL_UNSUPPORTED),
}


def ensure_model(workload: Workload, cache_dir: Path) -> Path:
    """A diffusers pipeline folder for the workload's architecture, random weights, built once."""
    from sdtune.io import build_once
    from sdtune.models.tiny import ensure_tiny_pipeline

    if workload.model == "tiny":
        return ensure_tiny_pipeline(cache_dir)
    from sdtune.data.cache import digest_of

    arch = ARCHITECTURES[workload.model]
    key = digest_of(arch, SD_SCHEDULER)[:12]
    return build_once(cache_dir / f"bench-{workload.model}-{key}", lambda out: _build_model(arch, out))


def _build_model(arch: dict[str, Any], out: Path) -> None:
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sdtune.models.tiny import MAX_TOKENS, TOKENIZER_DIR

    tokenizer = CLIPTokenizer(
        str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"), model_max_length=MAX_TOKENS
    )
    text = {"vocab_size": len(tokenizer), "max_position_embeddings": MAX_TOKENS, **arch["text"]}
    special = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    torch.manual_seed(0)
    StableDiffusionPipeline(
        vae=AutoencoderKL(**arch["vae"]),
        text_encoder=CLIPTextModel(CLIPTextConfig(**text, **special)),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(**arch["unet"]),
        scheduler=DDPMScheduler(**SD_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(out, safe_serialization=True)


def ensure_data(workload: Workload, num_images: int, cache_dir: Path) -> Path:
    from sdtune.data.shapes import ensure_dataset

    return ensure_dataset(cache_dir, num_images, workload.resolution, 0)
