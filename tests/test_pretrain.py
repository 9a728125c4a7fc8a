"""Pretraining the tiny stack (stage one: the autoencoder) and the shipped pretrained weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdtune.autoencoder import latent_scaling_factor, reconstruction_losses
from sdtune.models import tiny


def test_reconstruction_losses_report_psnr_of_the_mse() -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**tiny.VAE_CONFIG)
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    losses = reconstruction_losses(vae, pixels, kl_weight=0.5)
    assert losses["psnr"] == pytest.approx(float(10 * torch.log10(4 / losses["mse"])), rel=1e-5)
    expected = losses["l1"] + losses["mse"] + 0.5 * losses["kl"]
    assert float(losses["loss"]) == pytest.approx(float(expected), rel=1e-5)
    losses["loss"].backward()
    assert (
        vae.encoder.conv_in.weight.grad.abs().sum() > 0 and vae.decoder.conv_out.weight.grad.abs().sum() > 0
    )


def test_pretrain_vae_trains_only_the_autoencoder_and_rescales_latents(train_cfg, tmp_path: Path) -> None:
    from sdtune.train import train

    run_dir = tmp_path / "vae"
    cfg = train_cfg(
        "+experiment=pretrain_vae",
        "data.num_images=32",
        "trainer.max_steps=3",
        "method.lr_warmup_steps=0",
        "callbacks.checkpoint.every_n_train_steps=3",
        run_dir=run_dir,
    )
    run = train(cfg)
    pipeline = run_dir / "pipeline"
    base = tiny.ensure_tiny_pipeline(Path(cfg.paths.cache_dir), "random")
    trained_vae = load_file(pipeline / "vae" / "diffusion_pytorch_model.safetensors")
    base_vae = load_file(base / "vae" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(trained_vae[k], base_vae[k]) for k in base_vae)
    trained_unet = load_file(pipeline / "unet" / "diffusion_pytorch_model.safetensors")
    base_unet = load_file(base / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(trained_unet[k], base_unet[k]) for k in base_unet)

    scale = json.loads((pipeline / "vae" / "config.json").read_text())["scaling_factor"]
    loader = run.trainer.datamodule.train_dataloader()
    assert scale == pytest.approx(latent_scaling_factor(run.module.vae, loader, 16), rel=1e-4)
    assert scale != tiny.VAE_CONFIG["scaling_factor"]


def test_vae_decoder_fine_tune_keeps_the_latents(train_cfg, tmp_path: Path) -> None:
    from sdtune.train import train

    run_dir = tmp_path / "decoder"
    cfg = train_cfg(
        "+experiment=vae_decoder",
        "data.num_images=32",
        "trainer.max_steps=3",
        "method.lr_warmup_steps=0",
        run_dir=run_dir,
    )
    train(cfg)
    base = tiny.ensure_tiny_pipeline(Path(cfg.paths.cache_dir), "pretrained")
    trained = load_file(run_dir / "pipeline" / "vae" / "diffusion_pytorch_model.safetensors")
    before = load_file(base / "vae" / "diffusion_pytorch_model.safetensors")
    decoder = [k for k in before if k.startswith(("decoder.", "post_quant_conv."))]
    encoder = [k for k in before if k not in decoder]
    assert decoder and encoder
    assert any(not torch.equal(trained[k], before[k]) for k in decoder)
    assert all(torch.equal(trained[k], before[k]) for k in encoder)  # same latents for the same image
    config = json.loads((run_dir / "pipeline" / "vae" / "config.json").read_text())
    assert (
        config["scaling_factor"] == json.loads((base / "vae" / "config.json").read_text())["scaling_factor"]
    )


def test_pretrain_requires_the_stage_one_pipeline(train_cfg) -> None:
    from sdtune.config import ConfigError, validate

    with pytest.raises(ConfigError, match="vae_run: required"):
        validate(train_cfg("+experiment=pretrain"))


def test_missing_pretrained_weights_are_named(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, train_cfg
) -> None:
    from sdtune.config import ConfigError, validate

    monkeypatch.setattr(tiny, "PRETRAINED_DIR", tmp_path)
    with pytest.raises(ConfigError, match="model.weights: the pretrained tiny stack is missing"):
        validate(train_cfg("+experiment=lora"))  # before anything is loaded
    validate(train_cfg("+experiment=lora", "model.weights=random"))
    with pytest.raises(FileNotFoundError, match="model.weights=random"):
        tiny.ensure_tiny_pipeline(tmp_path / "cache", "pretrained")
    with pytest.raises(ValueError, match="model.weights"):
        tiny.ensure_tiny_pipeline(tmp_path / "cache", "best")
