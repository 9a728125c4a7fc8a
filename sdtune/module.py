"""The one LightningModule: the latent-diffusion objective over whatever the chosen method made trainable."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from torch import Tensor

from sdtune.conditioning import ConditioningStack, Conditions
from sdtune.losses import min_snr_weights, per_sample_mse, prediction_target, sample_noise
from sdtune.models.loading import Stack
from sdtune.sampling import generate, make_scheduler


class DiffusionModule(pl.LightningModule):
    """Trains the denoising U-Net (through its adapters or in full) on VAE latents of the batch images."""

    def __init__(
        self, stack: Stack, conditioning: ConditioningStack, method: DictConfig, loss: DictConfig
    ) -> None:
        super().__init__()
        self.stack = stack
        self.vae = stack.vae
        self.unet = stack.unet
        self.conditioning = conditioning
        self.method = method
        self.loss_cfg = loss
        self.prediction_type = loss.prediction_type or stack.noise_scheduler.config.prediction_type
        # Checkpoints hold only what trains; the frozen base comes from model.pretrained.
        self.strict_loading = False
        self.vae_full_precision = False  # runtime.vae_dtype=float32: encode outside autocast

    # ---- training ---------------------------------------------------------------------------------------

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        latents = self.batch_latents(batch)
        conditions = self.conditioning(batch, self.conditioning.training_drop(latents.shape[0]))
        loss = self.per_sample_loss(latents, conditions).mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=latents.shape[0])
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=latents.shape[0])
        return loss

    def batch_latents(self, batch: dict[str, Any]) -> Tensor:
        """z0 of the batch: sampled from cached posterior moments (`sdtune.data.cache`), or encoded now."""
        if "latent_moments" in batch:
            from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

            posterior = DiagonalGaussianDistribution(batch["latent_moments"])
            return posterior.sample() * self.vae.config.scaling_factor
        return self.encode_latents(batch["pixel_values"])

    @torch.no_grad()
    def encode_latents(self, pixels: Tensor) -> Tensor:
        """Scaled VAE latents z0 = E(x) · scaling_factor (a sample of the posterior)."""
        full = torch.autocast(pixels.device.type, enabled=False) if self.vae_full_precision else nullcontext()
        with full:
            posterior = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        return posterior.sample() * self.vae.config.scaling_factor

    def per_sample_loss(self, latents: Tensor, conditions: Conditions) -> Tensor:
        """Denoising loss of each sample at a random timestep (min-SNR weighted if configured)."""
        scheduler = self.stack.noise_scheduler
        noise = sample_noise(latents, self.loss_cfg.noise_offset)
        timesteps = torch.randint(
            0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device
        )
        noisy = scheduler.add_noise(latents, noise, timesteps)
        pred = self.unet(
            conditions.unet_input(noisy), timesteps, encoder_hidden_states=conditions.crossattn
        ).sample
        target = prediction_target(scheduler, latents, noise, timesteps, self.prediction_type)
        losses = per_sample_mse(pred, target)
        if self.loss_cfg.snr_gamma is not None:
            weights = min_snr_weights(scheduler, timesteps, self.loss_cfg.snr_gamma, self.prediction_type)
            return losses * weights
        return losses

    def train(self, mode: bool = True) -> DiffusionModule:
        super().train(mode)
        self.vae.eval()  # frozen; keeps e.g. dropout and norm statistics fixed
        return self

    # ---- optimisation -----------------------------------------------------------------------------------

    def trainable_parameters(self) -> dict[str, Tensor]:
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    def configure_optimizers(self) -> dict[str, Any]:
        from diffusers.optimization import get_scheduler

        method = self.method
        unet_params = [p for p in self.unet.parameters() if p.requires_grad]
        text_params = [p for p in self.conditioning.parameters() if p.requires_grad]
        groups = [{"params": unet_params, "lr": method.lr}]
        if text_params:
            groups.append({"params": text_params, "lr": method.text_encoder_lr})
        optimizer = _optimizer_class(method.optimizer)(
            groups, lr=method.lr, betas=tuple(method.betas), eps=method.eps, weight_decay=method.weight_decay
        )
        schedule = get_scheduler(
            method.lr_scheduler,
            optimizer,
            num_warmup_steps=method.lr_warmup_steps,
            num_training_steps=self.trainer.max_steps,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = self.trainable_parameters()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["sdtune"] = {"method": self.method.name, "base_model": self.stack.base_model}

    # ---- sampling ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, batch: dict[str, Any], sampling: DictConfig, resolution: int) -> Tensor:
        """Images for `batch` (e.g. {"caption": prompts}) with the configured scheduler and guidance."""
        scheduler = make_scheduler(sampling.scheduler, self.stack.scheduler_config, seed=sampling.seed)
        was_training = self.training
        self.eval()
        try:
            return generate(
                self.unet,
                self.vae,
                self.conditioning,
                batch,
                scheduler=scheduler,
                steps=sampling.steps,
                guidance=sampling.guidance,
                seed=sampling.seed,
                height=resolution,
                width=resolution,
            )
        finally:
            self.train(was_training)


def _optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit
    return torch.optim.AdamW
