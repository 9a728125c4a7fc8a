"""Stage one of latent diffusion: train the autoencoder (E and D) on the training images, or (`method.parts:
decoder`) fine-tune only the decoder D of a trained one, which leaves the latents, so the U-Net, unchanged.

Loss = reconstruction (L1 + MSE in [-1, 1] pixel space) + `method.kl_weight` × KL(q(z|x) ‖ N(0, I)), the
latent-diffusion paper's KL-regularised autoencoder without its perceptual and adversarial terms (a small
synthetic world does not need them). At the end of training the latent scaling factor is re-estimated
(1 / std of the posterior means, as SD's 0.18215 was), so stage two's U-Net sees unit-variance latents.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor

SCALE_BATCHES = 16


class AutoencoderModule(pl.LightningModule):
    """Trains `stack.vae`; the rest of the stack is carried along unchanged (and exported with it)."""

    def __init__(self, stack: Any, conditioning: Any, method: DictConfig) -> None:
        super().__init__()
        self.stack = stack
        self.vae = stack.vae
        self.unet = stack.unet  # exported unchanged beside the trained VAE
        self.conditioning = conditioning
        self.method = method
        self.prediction_type = stack.noise_scheduler.config.prediction_type
        self.strict_loading = False

    @property
    def decoder_only(self) -> bool:
        return self.method.get("parts", "all") == "decoder"

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        pixels = batch["pixel_values"]
        frozen = self.decoder_only
        losses = reconstruction_losses(self.vae, pixels, self.method.kl_weight, frozen_encoder=frozen)
        size = pixels.shape[0]
        for name, value in losses.items():
            self.log(f"train/{name}", value, prog_bar=name in ("loss", "psnr"), batch_size=size)
        return losses["loss"]

    def configure_optimizers(self) -> dict[str, Any]:
        from diffusers.optimization import get_scheduler

        method = self.method
        optimizer = torch.optim.AdamW(
            [p for p in self.vae.parameters() if p.requires_grad],
            lr=method.lr,
            betas=tuple(method.betas),
            eps=method.eps,
            weight_decay=method.weight_decay,
        )
        schedule = get_scheduler(
            method.lr_scheduler,
            optimizer,
            num_warmup_steps=method.lr_warmup_steps,
            num_training_steps=self.trainer.max_steps,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        prefix = "vae."
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
        checkpoint["sdtune"] = {"method": self.method.name, "base_model": self.stack.base_model}

    def on_train_end(self) -> None:
        if self.decoder_only:
            return  # the encoder, hence the latents and their scaling factor, did not change
        loader = self.trainer.datamodule.train_dataloader()
        scale = latent_scaling_factor(self.vae, loader, SCALE_BATCHES)
        self.vae.register_to_config(scaling_factor=scale)
        self.print(f"latent scaling factor: {scale:.5f} (1 / std of the posterior means)")


def reconstruction_losses(
    vae: Any, pixels: Tensor, kl_weight: float, frozen_encoder: bool = False
) -> dict[str, Tensor]:
    """Loss and its parts for one batch of pixels in [-1, 1] (a frozen encoder's KL term is a constant)."""
    with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen_encoder):
        posterior = vae.encode(pixels).latent_dist
    recon = vae.decode(posterior.sample()).sample
    mse = F.mse_loss(recon, pixels)
    l1 = F.l1_loss(recon, pixels)
    kl = posterior.kl().mean() / pixels[0].numel()  # per pixel value, so kl_weight does not depend on size
    loss = l1 + mse + kl_weight * kl
    psnr = 10 * torch.log10(4.0 / mse.detach().clamp_min(1e-10))  # peak-to-peak range 2 → peak² = 4
    return {"loss": loss, "l1": l1.detach(), "mse": mse.detach(), "kl": kl.detach(), "psnr": psnr}


@torch.no_grad()
def latent_scaling_factor(vae: Any, loader: Any, batches: int) -> float:
    """1 / std of the posterior means over the first `batches` batches."""
    means = []
    for index, batch in enumerate(loader):
        if index >= batches:
            break
        pixels = batch["pixel_values"].to(vae.device, vae.dtype)
        means.append(vae.encode(pixels).latent_dist.mean.float().flatten())
    return float(1.0 / torch.cat(means).std())
