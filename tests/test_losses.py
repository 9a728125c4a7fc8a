import pytest
import torch
from diffusers import DDPMScheduler

from sdtune.losses import (
    min_snr_weights,
    per_sample_mse,
    prediction_target,
    sample_noise,
    sample_timesteps,
    snr,
    timestep_weights,
)


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


def test_timesteps_are_uniform_without_a_bias() -> None:
    assert timestep_weights(1000) is None and timestep_weights(1000, "earlier", multiplier=1.0) is None
    torch.manual_seed(0)
    t = sample_timesteps(20000, 1000, None, torch.device("cpu"))
    assert t.min() >= 0 and t.max() <= 999 and (t < 250).float().mean() == pytest.approx(0.25, abs=0.015)


@pytest.mark.parametrize(
    ("strategy", "favoured", "share"),
    [
        # 250 timesteps at weight 3 against 750 at 1: they hold 750 / 1500 of the draws
        ("earlier", lambda t: t < 250, 0.5),
        ("later", lambda t: t >= 750, 0.5),
        # 100 timesteps at weight 3 against 900 at 1: 300 / 1200
        ("range", lambda t: (t >= 400) & (t < 500), 0.25),
    ],
)
def test_timestep_bias_draws_the_favoured_timesteps_more_often(strategy, favoured, share) -> None:
    weights = timestep_weights(1000, strategy, multiplier=3.0, portion=0.25, span=(400, 500))
    torch.manual_seed(0)
    t = sample_timesteps(40000, 1000, weights, torch.device("cpu"))
    assert t.min() >= 0 and t.max() <= 999
    assert favoured(t).float().mean() == pytest.approx(share, abs=0.015)


def test_a_timestep_range_past_the_schedule_is_refused() -> None:
    with pytest.raises(ValueError, match="loss.timestep_bias.range.*0..999"):
        timestep_weights(1000, "range", multiplier=2.0, span=(1000, 1200))
    with pytest.raises(ValueError, match="loss.timestep_bias.range"):
        timestep_weights(1000, "range", multiplier=2.0)


def test_training_draws_its_timesteps_with_the_configured_bias(train_cfg, monkeypatch) -> None:
    import sdtune.module
    from sdtune.train import train

    drawn: list[torch.Tensor] = []

    def recorded(*args, **kwargs):
        drawn.append(sample_timesteps(*args, **kwargs))
        return drawn[-1]

    monkeypatch.setattr(sdtune.module, "sample_timesteps", recorded)

    run = train(
        train_cfg(
            "+experiment=lora",
            "trainer.max_steps=2",
            "data.num_images=4",
            "data.batch_size=2",
            "sampling.prompts=[]",
            "export.formats=[]",
            "logger=none",
            "runtime.threads=1",
            "loss.timestep_bias.strategy=range",
            "loss.timestep_bias.range=[0,100]",
            "loss.timestep_bias.multiplier=1e9",
        )
    )
    assert run.trainer.global_step == 2
    assert len(drawn) == 2 and all(int(t.max()) < 100 for t in drawn)  # a 1e9 bias toward [0, 100)


def test_a_timestep_range_past_the_models_schedule_is_a_config_error(train_cfg) -> None:
    from sdtune.config import ConfigError
    from sdtune.train import train

    cfg = train_cfg(
        "+experiment=lora",
        "logger=none",
        "loss.timestep_bias.strategy=range",
        "loss.timestep_bias.range=[2000,3000]",  # valid on its own; the tiny model has 1,000 timesteps
    )
    with pytest.raises(ConfigError, match=r"loss.timestep_bias.range.*0..999"):
        train(cfg)
