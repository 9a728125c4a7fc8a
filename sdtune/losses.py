"""The latent-diffusion objective: timesteps, targets, min-SNR weighting, noise offset, pseudo-Huber loss."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def sample_noise(
    latents: Tensor,
    noise_offset: float = 0.0,
    generator: torch.Generator | None = None,
    multires_iterations: int = 0,
    multires_discount: float = 0.3,
) -> Tensor:
    """Gaussian noise like `latents`; `multires_iterations` makes it pyramid noise (`pyramid_noise`),
    `noise_offset` adds a per-channel constant (dark or bright images)."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if multires_iterations:
        noise = pyramid_noise(noise, multires_iterations, multires_discount, generator)
    if noise_offset:
        offset = torch.randn(
            latents.shape[:2], generator=generator, device=latents.device, dtype=latents.dtype
        )
        noise = noise + noise_offset * offset[..., None, None]
    return noise


def pyramid_noise(
    noise: Tensor, iterations: int, discount: float, generator: torch.Generator | None = None
) -> Tensor:
    """Multi-resolution ("pyramid") noise, sd-scripts' --multires_noise_iterations: coarser and coarser
    Gaussian fields (each 2–4× smaller than the last, weighted `discount`^i) upsampled onto `noise`, then
    every sample rescaled to unit variance; low frequencies get noised too, so the model learns them."""
    batch, channels, height, width = noise.shape
    out = noise.float()
    for i in range(1, iterations + 1):
        ratio = 2.0 + 2.0 * float(torch.rand((), generator=generator))
        size = (max(1, int(height / ratio**i)), max(1, int(width / ratio**i)))
        coarse = torch.randn((batch, channels, *size), generator=generator, device=noise.device)
        out = out + F.interpolate(coarse, size=(height, width), mode="bilinear") * discount**i
        if 1 in size:
            break
    out = out / out.std(dim=(1, 2, 3), keepdim=True)
    return out.to(noise.dtype)


def perturbed(noise: Tensor, gamma: float, generator: torch.Generator | None = None) -> Tensor:
    """Input perturbation (Ning et al. 2023; diffusers' --input_perturbation, sd-scripts' --ip_noise_gamma):
    the noise the model's input is made with, `noise` + γ·ε′, while the target keeps `noise`."""
    extra = torch.randn(noise.shape, generator=generator, device=noise.device, dtype=noise.dtype)
    return noise + gamma * extra


TIMESTEP_BIAS = ("none", "earlier", "later", "range")


def timestep_weights(
    num_train_timesteps: int,
    strategy: str = "none",
    multiplier: float = 1.0,
    portion: float = 0.25,
    span: tuple[int, int] | None = None,
) -> Tensor | None:
    """Relative probability of training at each timestep; None = uniform.

    `earlier` favours the first `portion` of the timesteps (little noise: fine detail), `later` the last
    (much noise: layout and shape), `range` the timesteps in `span` = [begin, end); each by `multiplier`.
    """
    if strategy == "none" or multiplier == 1.0:
        return None
    weights = torch.ones(num_train_timesteps)
    count = max(1, round(num_train_timesteps * portion))
    if strategy == "earlier":
        weights[:count] = multiplier
    elif strategy == "later":
        weights[-count:] = multiplier
    elif strategy == "range":
        if span is None or not 0 <= span[0] < num_train_timesteps:
            raise ValueError(
                f"loss.timestep_bias.range: {span and list(span)} must begin within the scheduler's "
                f"timesteps 0..{num_train_timesteps - 1}"
            )
        weights[span[0] : span[1]] = multiplier
    else:
        raise ValueError(f"unknown timestep bias {strategy!r}; use one of {', '.join(TIMESTEP_BIAS)}")
    return weights


def sample_timesteps(
    count: int, num_train_timesteps: int, weights: Tensor | None, device: torch.device
) -> Tensor:
    """`count` training timesteps: uniform, or drawn with `timestep_weights`."""
    if weights is None:
        return torch.randint(0, num_train_timesteps, (count,), device=device)
    return torch.multinomial(weights, count, replacement=True).to(device)


def prediction_target(
    scheduler: Any, latents: Tensor, noise: Tensor, timesteps: Tensor, prediction_type: str
) -> Tensor:
    """What the U-Net should predict: ε, or v = √ᾱ·ε − √(1−ᾱ)·x₀."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction type {prediction_type!r}; use epsilon or v_prediction")


def snr(scheduler: Any, timesteps: Tensor) -> Tensor:
    """Signal-to-noise ratio ᾱ/(1−ᾱ) at each timestep."""
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alphas_cumprod / (1 - alphas_cumprod)


def min_snr_weights(scheduler: Any, timesteps: Tensor, gamma: float, prediction_type: str) -> Tensor:
    """Per-sample loss weights of min-SNR-γ (Hang et al. 2023): min(SNR, γ)/SNR for ε, /(SNR+1) for v."""
    ratio = snr(scheduler, timesteps)
    clipped = torch.minimum(ratio, torch.full_like(ratio, gamma))
    return clipped / (ratio + 1) if prediction_type == "v_prediction" else clipped / ratio


def debiased_weights(scheduler: Any, timesteps: Tensor, prediction_type: str) -> Tensor:
    """Per-sample weights of debiased estimation (Yu et al. 2024; sd-scripts' --debiased_estimation_loss):
    1/√SNR for ε (1/(SNR + 1) for v), SNR capped at 1000 so the least noisy steps keep a finite weight."""
    ratio = snr(scheduler, timesteps).clamp(max=1000.0)
    return 1 / (ratio + 1) if prediction_type == "v_prediction" else ratio.rsqrt()


def per_sample_mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error of each sample, in fp32."""
    return F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(dim=1)


LOSS_TYPES = ("mse", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")


def huber_c(scheduler: Any, timesteps: Tensor, c: float, schedule: str) -> Tensor:
    """Each sample's pseudo-Huber threshold: `c`, or (`exponential`, `snr`) near 1 at little noise, where
    errors are small and the loss should stay quadratic, falling to `c` at much noise (sd-scripts')."""
    if schedule == "constant":
        return torch.full(timesteps.shape, c, device=timesteps.device)
    if schedule == "exponential":
        rate = -math.log(c) / scheduler.config.num_train_timesteps
        return torch.exp(-rate * timesteps.float())
    if schedule == "snr":
        sigmas = snr(scheduler, timesteps).rsqrt()
        return (1 - c) / (1 + sigmas) ** 2 + c
    raise ValueError(f"unknown huber schedule {schedule!r}; use one of {', '.join(HUBER_SCHEDULES)}")


def per_sample_pseudo_huber(pred: Tensor, target: Tensor, c: Tensor, kind: str = "huber") -> Tensor:
    """Pseudo-Huber loss of each sample, in fp32: 2c(√(δ² + c²) − c) (`huber`: ≈ δ² for |δ| ≪ c, linear past
    it) or 2(√(δ² + c²) − c) (`smooth_l1`: ≈ 2|δ| for |δ| ≫ c); `c` holds one threshold per sample."""
    c = c.float().reshape(-1, *[1] * (pred.dim() - 1))
    pseudo = torch.sqrt((pred.float() - target.float()) ** 2 + c**2) - c
    scale = 2 * c if kind == "huber" else 2.0
    return (scale * pseudo).flatten(1).mean(dim=1)


@dataclass(frozen=True)
class Objective:
    """The per-step loss options of a run (`loss.*`), read from the config once rather than every step."""

    noise_offset: float = 0.0
    multires_iterations: int = 0
    multires_discount: float = 0.3
    input_perturbation: float = 0.0
    kind: str = "mse"  # mse | huber | smooth_l1
    huber_c: float = 0.1
    huber_schedule: str = "snr"
    snr_gamma: float | None = None
    debiased: bool = False

    @classmethod
    def from_config(cls, loss: Any) -> Objective:
        """From a `loss` config section (keys it lacks keep their defaults)."""
        return cls(
            noise_offset=loss.get("noise_offset", 0.0),
            multires_iterations=loss.get("multires_noise_iterations", 0),
            multires_discount=loss.get("multires_noise_discount", 0.3),
            input_perturbation=loss.get("input_perturbation", 0.0),
            kind=loss.get("type", "mse"),
            huber_c=loss.get("huber_c", 0.1),
            huber_schedule=loss.get("huber_schedule", "snr"),
            snr_gamma=loss.get("snr_gamma"),
            debiased=loss.get("debiased_estimation", False),
        )


def weighted_mean(losses: Tensor, weights: Tensor | None) -> Tensor:
    return losses.mean() if weights is None else (losses * weights).mean()


class NonFiniteLossError(RuntimeError):
    """Too many consecutive training steps had a NaN/inf loss (or the weights became non-finite)."""


LIKELY_CAUSES = (
    "Likely causes: a learning rate too high for this method (lower method.lr, add method.lr_warmup_steps); "
    "fp16 overflow, often in the VAE (use trainer.precision=bf16-mixed or 32-true, or an fp16-safe VAE); "
    "bad data (an image that decodes to extreme values). Checkpoints are never written with non-finite "
    "weights, so the last one is intact: fix the cause and continue with resume=<run dir>."
)


class NonFiniteGuard:
    """Counts steps whose loss is NaN/inf (those steps are skipped) and stops after `limit` in a row."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.total = 0
        self.streak = 0

    def update(self, finite: bool, step: int, last_checkpoint: str | None = None) -> None:
        """Record one step; raises NonFiniteLossError on the `limit`-th non-finite step in a row."""
        if finite:
            self.streak = 0
            return
        self.total += 1
        self.streak += 1
        if self.streak >= self.limit:
            where = f"last good checkpoint: {last_checkpoint}" if last_checkpoint else "no checkpoint yet"
            raise NonFiniteLossError(
                f"the loss was NaN/inf for {self.streak} consecutive steps (up to step {step}; "
                f"{self.total} in total; loss.max_nonfinite_steps={self.limit}); stopping ({where}). "
                + LIKELY_CAUSES
            )

    def check_weights(self, tensors: dict[str, Tensor], step: int) -> None:
        """Raise NonFiniteLossError if any of `tensors` holds NaN/inf (called before writing a checkpoint)."""
        broken = [name for name, value in tensors.items() if not torch.isfinite(value).all()]
        if broken:
            raise NonFiniteLossError(
                f"the trained weights became NaN/inf by step {step} ({broken[0]}, {len(broken)} tensor(s)); "
                "not writing this checkpoint. " + LIKELY_CAUSES
            )


def prior_preservation_loss(
    losses: Tensor, is_class: Tensor, prior_loss_weight: float
) -> tuple[Tensor, Tensor, Tensor]:
    """DreamBooth's loss: the instance rows' mean + `prior_loss_weight` × the class rows' mean.

    `losses` are per-sample losses of a batch holding instance and class images; `is_class` marks the class
    rows. Returns (total, instance loss, class loss).
    """
    is_class = is_class.to(device=losses.device, dtype=torch.bool)
    instance = losses[~is_class].mean()
    prior = losses[is_class].mean()
    return instance + prior_loss_weight * prior, instance, prior
