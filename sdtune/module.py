"""The one LightningModule: the latent-diffusion objective over whatever the chosen method made trainable."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from sdtune.conditioning import ConditioningStack, Conditions
from sdtune.conditioning.text import with_micro_conditioning
from sdtune.config import ConfigError
from sdtune.losses import (
    NonFiniteGuard,
    Objective,
    debiased_weights,
    huber_c,
    min_snr_weights,
    per_sample_mse,
    per_sample_pseudo_huber,
    perturbed,
    prediction_target,
    prior_preservation_loss,
    sample_noise,
    sample_timesteps,
    timestep_weights,
)
from sdtune.models.adapters import adapters_disabled
from sdtune.models.loading import Stack, vae_scale_factor
from sdtune.optimizers import build_optimizer
from sdtune.precision import MasterWeights, over_masters
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
        self.objective = Objective.from_config(loss)
        self.prediction_type = loss.prediction_type or stack.noise_scheduler.config.prediction_type
        # Checkpoints hold only what trains; the frozen base comes from model.pretrained.
        self.strict_loading = False
        self.nonfinite = NonFiniteGuard(loss.max_nonfinite_steps)
        self.preserve_unconditional = bool(method.get("preserve_unconditional")) if method else False
        self.timestep_weights = _timestep_weights(loss, stack.noise_scheduler.config.num_train_timesteps)
        self.vae_full_precision = False  # runtime.vae_dtype=float32: encode outside autocast
        self.fused_optimizer = False  # runtime.fused_optimizer: torch's fused AdamW when training on a GPU
        self.master_weights = False  # trainer.precision=bf16-true: the optimizer steps fp32 copies
        self.masters: MasterWeights | None = None  # built with the optimizer
        self._resumed_masters: dict[str, Tensor] | None = None  # fp32 values from a checkpoint

    # ---- training ---------------------------------------------------------------------------------------

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        loss, parts = self.batch_loss(batch)
        if not self.loss_is_finite(loss):
            return None  # Lightning skips backward and the optimizer step
        size = len(batch["caption"])
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        for name, value in parts.items():
            self.log(f"train/{name}", value, batch_size=size)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=size)
        return loss

    def batch_loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of a batch, and its parts to log.

        A DreamBooth batch (it has `is_class`) gives instance loss + `method.prior_loss_weight` × class loss.
        """
        latents = self.batch_latents(batch)
        height, width = (side * self.vae_scale_factor for side in latents.shape[-2:])
        batch = with_micro_conditioning(batch, latents.shape[0], height, width)
        drop = self.conditioning.training_drop(latents.shape[0])
        conditions = self.conditioning(batch, drop)
        unconditional = self.base_unconditional(batch, drop) if self.preserve_unconditional else None
        losses = self.per_sample_loss(latents, conditions, unconditional)
        if "is_class" not in batch:
            return losses.mean(), {}
        loss, instance, prior = prior_preservation_loss(
            losses, batch["is_class"], self.method.prior_loss_weight
        )
        return loss, {"instance_loss": instance.detach(), "prior_loss": prior.detach()}

    def loss_is_finite(self, loss: Tensor) -> bool:
        """False when the loss is NaN/inf on any rank (the step is then skipped and counted)."""
        finite = bool(torch.isfinite(loss))
        if self.trainer.world_size > 1:  # skip on every rank or none, or DDP hangs
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        last = getattr(self.trainer.checkpoint_callback, "last_model_path", None)
        self.nonfinite.update(finite, self.global_step, last)
        self.log("train/nonfinite_steps", float(self.nonfinite.total), batch_size=1)
        return finite

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

    @torch.no_grad()
    def base_unconditional(
        self, batch: dict[str, Any], drop: dict[str, Tensor]
    ) -> tuple[Tensor, Conditions] | None:
        """The samples `drop` left with no condition at all, and the frozen base's (empty) conditions for
        them; None when there are none."""
        mask = self.conditioning.all_dropped(drop)
        if not mask.any():
            return None
        with adapters_disabled(self.conditioning):
            conditions = self.conditioning(batch, drop)
        return mask, conditions.select(mask)

    def per_sample_loss(
        self, latents: Tensor, conditions: Conditions, unconditional: tuple[Tensor, Conditions] | None = None
    ) -> Tensor:
        """Denoising loss (MSE or pseudo-Huber) of each sample at a random timestep, min-SNR and/or debiased-
        estimation weighted if configured. `unconditional` (`method.preserve_unconditional`): those samples
        learn the frozen base's prediction instead of their image."""
        scheduler = self.stack.noise_scheduler
        objective = self.objective
        noise = sample_noise(
            latents,
            objective.noise_offset,
            multires_iterations=objective.multires_iterations,
            multires_discount=objective.multires_discount,
        )
        timesteps = sample_timesteps(
            latents.shape[0], scheduler.config.num_train_timesteps, self.timestep_weights, latents.device
        )
        gamma = objective.input_perturbation
        noisy = scheduler.add_noise(latents, perturbed(noise, gamma) if gamma else noise, timesteps)
        pred = self.unet(conditions.unet_input(noisy), timesteps, **conditions.unet_kwargs()).sample
        target = prediction_target(scheduler, latents, noise, timesteps, self.prediction_type)
        if unconditional is not None:
            target = self.base_target(target, noisy, timesteps, *unconditional)
        if objective.kind == "mse":
            losses = per_sample_mse(pred, target)
        else:
            c = huber_c(scheduler, timesteps, objective.huber_c, objective.huber_schedule)
            losses = per_sample_pseudo_huber(pred, target, c, objective.kind)
        if objective.snr_gamma is not None:
            losses = losses * min_snr_weights(scheduler, timesteps, objective.snr_gamma, self.prediction_type)
        if objective.debiased:
            losses = losses * debiased_weights(scheduler, timesteps, self.prediction_type)
        return losses

    @torch.no_grad()
    def base_target(
        self, target: Tensor, noisy: Tensor, timesteps: Tensor, mask: Tensor, conditions: Conditions
    ) -> Tensor:
        """`target` with the masked samples' replaced by the frozen base's prediction for them. Caption
        dropout would otherwise teach the adapter to draw the new concept unconditionally too, and
        classifier-free guidance, which amplifies conditional − unconditional, then loses it."""
        mask = mask.to(target.device)
        with adapters_disabled(self.unet):
            base = self.unet(
                conditions.unet_input(noisy[mask]), timesteps[mask], **conditions.unet_kwargs()
            ).sample
        target = target.clone()
        target[mask] = base.to(target.dtype)
        return target

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent: 2^(VAE levels − 1)."""
        return vae_scale_factor(self.vae)

    def train(self, mode: bool = True) -> DiffusionModule:
        super().train(mode)
        self.vae.eval()  # frozen; keeps e.g. dropout and norm statistics fixed
        return self

    # ---- optimisation -----------------------------------------------------------------------------------

    def trainable_parameters(self) -> dict[str, Tensor]:
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    def full_precision_weights(self) -> dict[str, Tensor]:
        """The trainable weights as the optimizer steps them: the fp32 masters under bf16-true, else the
        parameters themselves (what an EMA should average)."""
        return self.masters.named() if self.masters is not None else self.trainable_parameters()

    def configure_optimizers(self) -> dict[str, Any]:
        from diffusers.optimization import get_scheduler

        method = self.method
        unet_params = [p for p in self.unet.parameters() if p.requires_grad]
        ratio = method.get("loraplus_lr_ratio")
        groups = [
            # An empty U-Net group (textual inversion) is kept: checkpoints hold this group layout.
            *(loraplus_groups(self.unet, method.lr, ratio) or [{"params": [], "lr": method.lr}]),
            *loraplus_groups(self.conditioning, method.text_encoder_lr, ratio),
        ]
        extra = {"fused": True} if self.fused_optimizer and _fusable(method.optimizer, unet_params) else {}
        if self.master_weights:
            self.masters = MasterWeights(self.trainable_parameters(), self._resumed_masters)
            groups = over_masters(groups, self.masters)
        optimizer = build_optimizer(method, groups, **extra)
        schedule = get_scheduler(
            method.lr_scheduler,
            optimizer,
            num_warmup_steps=method.lr_warmup_steps,
            num_training_steps=self.trainer.max_steps,
        )
        if self.masters is not None:
            optimizer.register_step_post_hook(self.masters.write_back)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.masters is not None:  # before clipping, which then sees the fp32 gradients it steps
            self.masters.take_grads()

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        # Two cases Lightning's precision plugins refuse, clipped here instead:
        # - FSDP (trainer=fsdp): the norm of sharded gradients is only known to the root FSDP module, which
        #   clips them itself (`clip_grad_norm_`, called on every rank).
        # - a fused AdamW, which unscales fp16 gradients inside its step: that matters only under fp16 loss
        #   scaling, where sdtune does not fuse; under bf16 nothing is scaled.
        root = self.trainer.model
        sharded = hasattr(root, "clip_grad_norm_")
        if not (sharded or optimizer.defaults.get("fused")):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        if not gradient_clip_val:
            return
        if sharded and gradient_clip_algorithm != "value":
            root.clip_grad_norm_(gradient_clip_val)
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if gradient_clip_algorithm == "value":  # per element: the same on shards
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = self.trainable_parameters()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        if self.masters is not None:  # resume exactly: the fp32 values, not their bf16 rounding
            checkpoint["state_dict"].update({k: v.detach().clone() for k, v in self.masters.named().items()})
        self.nonfinite.check_weights(checkpoint["state_dict"], self.global_step)  # never save broken weights
        checkpoint["sdtune"] = {"method": self.method.name, "base_model": self.stack.base_model}
        checkpoint["sdtune"]["nonfinite_steps"] = self.nonfinite.total

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.nonfinite.total = checkpoint.get("sdtune", {}).get("nonfinite_steps", 0)
        trainable = self.trainable_parameters()
        values = {k: v for k, v in checkpoint.get("state_dict", {}).items() if k in trainable}
        if self.masters is not None:  # the strategy restores after building the optimizer
            self.masters.load(values)
        elif self.master_weights:  # restored before the module is cast to bf16: the masters start from these
            self._resumed_masters = values

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
                condition_guidance=sampling.condition_guidance,
                guidance_rescale=sampling.get("guidance_rescale", 0.0),
            )
        finally:
            self.train(was_training)


def _timestep_weights(loss: DictConfig, num_train_timesteps: int) -> Tensor | None:
    bias = loss.get("timestep_bias")
    if not bias:
        return None
    span = tuple(bias.range) if bias.get("range") is not None else None
    try:
        return timestep_weights(num_train_timesteps, bias.strategy, bias.multiplier, bias.portion, span)
    except ValueError as error:  # only the scheduler's length is checked here; the rest by validation
        raise ConfigError([str(error)]) from None


def _fusable(name: str, params: list[Tensor]) -> bool:
    """torch's AdamW: one fused kernel for every parameter instead of a few launches per tensor group.

    Only on CUDA, where a LoRA step is bound by kernel launches (measured on an H200: a compiled SD1.5 LoRA
    step 121 → 76 ms); on the CPU the default foreach path is kept.
    """
    return name == "adamw" and bool(params) and all(p.is_cuda for p in params)


def loraplus_groups(model: nn.Module, lr: float, ratio: float | None) -> list[dict[str, Any]]:
    """The optimizer groups of `model`'s trainable weights (none if it has none): one at `lr`, or with a
    LoRA+ `ratio` (Hayou et al. 2024; kohya's loraplus_lr_ratio) the LoRA B matrices apart at `lr` × ratio."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if ratio is None:
        return [{"params": [p for _, p in named], "lr": lr}] if named else []
    is_b = ["lora_B" in n or "lora_embedding_B" in n for n, _ in named]
    rest = [p for (_, p), b in zip(named, is_b) if not b]
    faster = [p for (_, p), b in zip(named, is_b) if b]
    groups = [{"params": rest, "lr": lr}, {"params": faster, "lr": lr * ratio}]
    return [group for group in groups if group["params"]]
