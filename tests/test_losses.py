import torch
from diffusers import DDPMScheduler

from sdtune.losses import min_snr_weights, per_sample_mse, prediction_target, sample_noise, snr


def scheduler() -> DDPMScheduler:
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def test_epsilon_target_is_the_noise() -> None:
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    target = prediction_target(scheduler(), latents, noise, torch.tensor([10, 900]), "epsilon")
    assert torch.equal(target, noise)


def test_v_target_matches_hand_computed_velocity() -> None:
    sched = scheduler()
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    # Hand computation from the betas: ᾱ_t = Π (1 - β_s), v = √ᾱ ε − √(1−ᾱ) x0.
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1 - betas, 0)[t].float().view(-1, 1, 1, 1)
    expected = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    target = prediction_target(sched, latents, noise, t, "v_prediction")
    torch.testing.assert_close(target, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(target, noise)


def test_min_snr_weights() -> None:
    sched = scheduler()
    t = torch.tensor([1, 500, 999])
    ratio = snr(sched, t)
    alpha_bar = sched.alphas_cumprod[t]
    torch.testing.assert_close(ratio, alpha_bar / (1 - alpha_bar))
    eps_w = min_snr_weights(sched, t, 5.0, "epsilon")
    v_w = min_snr_weights(sched, t, 5.0, "v_prediction")
    torch.testing.assert_close(eps_w, torch.minimum(ratio, torch.tensor(5.0)) / ratio)
    torch.testing.assert_close(v_w, torch.minimum(ratio, torch.tensor(5.0)) / (ratio + 1))
    assert eps_w[0] < 1 and eps_w[2] == 1  # low-noise steps are down-weighted, high-noise ones kept


def test_noise_offset_shifts_each_channel_by_a_constant() -> None:
    latents = torch.zeros(3, 4, 16, 16)
    torch.manual_seed(0)
    plain = sample_noise(latents)
    torch.manual_seed(0)
    offset = sample_noise(latents, noise_offset=0.5)
    shift = offset - plain
    assert shift.abs().max() > 0
    torch.testing.assert_close(shift, shift[..., :1, :1].expand_as(shift))


def test_per_sample_mse() -> None:
    pred = torch.zeros(2, 1, 2, 2)
    target = torch.stack([torch.ones(1, 2, 2), 2 * torch.ones(1, 2, 2)])
    torch.testing.assert_close(per_sample_mse(pred, target), torch.tensor([1.0, 4.0]))
