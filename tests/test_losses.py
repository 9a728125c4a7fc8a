import pytest
import torch
from diffusers import DDPMScheduler

from sdtune.losses import (
    debiased_weights,
    huber_c,
    min_snr_weights,
    per_sample_mse,
    per_sample_pseudo_huber,
    perturbed,
    prediction_target,
    pyramid_noise,
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


def test_pseudo_huber_is_quadratic_for_small_errors_and_linear_for_large_ones() -> None:
    pred, target = torch.zeros(3, 4, 2, 2), torch.zeros(3, 4, 2, 2)
    target[0] = 0.01  # |δ| ≪ c: huber ≈ δ², as MSE
    target[1] = 10.0  # |δ| ≫ c: huber ≈ 2c|δ|, smooth_l1 ≈ 2|δ|
    target[2] = 1000.0
    c = torch.full((3,), 0.1)
    huber = per_sample_pseudo_huber(pred, target, c, "huber")
    torch.testing.assert_close(huber[0], per_sample_mse(pred, target)[0], rtol=1e-2, atol=0)
    torch.testing.assert_close(huber[1], torch.tensor(2 * 0.1 * 10.0), rtol=2e-2, atol=0)
    smooth = per_sample_pseudo_huber(pred, target, c, "smooth_l1")
    torch.testing.assert_close(smooth[2], torch.tensor(2 * 1000.0), rtol=1e-3, atol=0)
    assert huber[2] / huber[1] < 101  # an outlier 100× larger weighs ≈ 100× more, not 10,000× as in MSE


def test_an_outlier_pulls_the_huber_gradient_no_harder_than_2c() -> None:
    pred = torch.zeros(1, 1, 1, 2, requires_grad=True)
    target = torch.tensor([[[[0.05, 50.0]]]])
    per_sample_pseudo_huber(pred, target, torch.tensor([0.1]), "huber").sum().backward()
    assert pred.grad.abs().max() <= 2 * 0.1 / 2 + 1e-6  # d/dδ of the mean over 2 elements, bounded by 2c/2


@pytest.mark.parametrize("schedule", ["exponential", "snr"])
def test_huber_schedules_fall_from_about_1_to_c_as_noise_grows(schedule) -> None:
    t = torch.arange(0, 1000, 50)
    c = huber_c(scheduler(), t, 0.1, schedule)
    assert torch.all(c[1:] <= c[:-1]) and 0.1 - 1e-6 <= float(c.min()) and float(c.max()) <= 1.0 + 1e-6
    assert float(c[0]) > 0.6 and float(c[-1]) < 0.15
    assert torch.equal(huber_c(scheduler(), t, 0.1, "constant"), torch.full(t.shape, 0.1))


def test_training_with_a_huber_loss_and_its_config_checks(train_cfg, monkeypatch) -> None:
    import sdtune.module
    from sdtune.config import ConfigError, validate
    from sdtune.train import train

    thresholds: list[torch.Tensor] = []

    def recorded(pred, target, c, kind):
        thresholds.append(c)
        assert kind == "huber"
        return per_sample_pseudo_huber(pred, target, c, kind)

    monkeypatch.setattr(sdtune.module, "per_sample_pseudo_huber", recorded)
    common = ["+experiment=lora", "data.num_images=4", "data.batch_size=2", "sampling.prompts=[]"]
    common += ["export.formats=[]", "logger=none", "runtime.threads=1"]
    run = train(
        train_cfg(*common, "trainer.max_steps=2", "loss.type=huber", "loss.huber_schedule=exponential")
    )
    assert run.trainer.global_step == 2
    assert len(thresholds) == 2 and all(
        0.1 - 1e-6 <= float(c.min()) <= float(c.max()) <= 1 for c in thresholds
    )
    with pytest.raises(ConfigError) as info:
        validate(train_cfg(*common, "loss.type=l1", "loss.huber_c=2"))
    assert "loss.type: 'l1' is not one of mse, huber, smooth_l1" in str(info.value)
    with pytest.raises(ConfigError, match=r"loss.huber_c: must be a number in \(0, 1\)"):
        validate(train_cfg(*common, "loss.type=smooth_l1", "loss.huber_c=2"))


def test_pyramid_noise_has_unit_variance_and_noises_the_low_frequencies() -> None:
    latents = torch.zeros(64, 4, 16, 16)
    plain = sample_noise(latents, generator=torch.Generator().manual_seed(0))
    seed = torch.Generator().manual_seed(0)
    pyramid = sample_noise(latents, generator=seed, multires_iterations=6, multires_discount=0.8)
    assert pyramid.shape == latents.shape
    torch.testing.assert_close(pyramid.std(dim=(1, 2, 3)), torch.ones(64), rtol=1e-4, atol=1e-4)
    # The mean of each channel (the lowest frequency) varies as 1/(H·W) for white noise, far more here.
    assert pyramid.mean(dim=(2, 3)).var() > 3 * plain.mean(dim=(2, 3)).var()
    again = pyramid_noise(plain, 6, 0.3, torch.Generator().manual_seed(1))
    assert torch.equal(again, pyramid_noise(plain, 6, 0.3, torch.Generator().manual_seed(1)))
    assert torch.equal(sample_noise(latents, generator=torch.Generator().manual_seed(0)), plain)


def test_input_perturbation_noises_the_input_but_not_the_target(train_cfg, monkeypatch) -> None:
    import sdtune.module
    from sdtune.train import train

    seen: dict[str, list[torch.Tensor]] = {"noise": [], "input": [], "target": []}

    def recorded_perturbed(noise, gamma, generator=None):
        out = perturbed(noise, gamma, generator)
        seen["noise"].append(noise)
        seen["input"].append(out)
        return out

    def recorded_target(scheduler, latents, noise, timesteps, prediction_type):
        seen["target"].append(noise)
        return prediction_target(scheduler, latents, noise, timesteps, prediction_type)

    monkeypatch.setattr(sdtune.module, "perturbed", recorded_perturbed)
    monkeypatch.setattr(sdtune.module, "prediction_target", recorded_target)
    common = ["+experiment=lora", "data.num_images=4", "data.batch_size=2", "sampling.prompts=[]"]
    common += ["export.formats=[]", "logger=none", "runtime.threads=1", "trainer.max_steps=2"]
    train(train_cfg(*common, "loss.input_perturbation=0.1", "loss.multires_noise_iterations=3"))
    assert len(seen["input"]) == 2 and len(seen["target"]) == 2
    for noise, given, target in zip(seen["noise"], seen["input"], seen["target"]):
        assert torch.equal(target, noise)
        spread = (given - noise).std()
        assert 0.05 < float(spread) < 0.2  # γ = 0.1


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_debiased_estimation_weights(prediction_type) -> None:
    sched = scheduler()
    t = torch.tensor([0, 10, 500, 999])
    ratio = snr(sched, t)
    want = (
        1 / ratio.clamp(max=1000).sqrt() if prediction_type == "epsilon" else 1 / (ratio.clamp(max=1000) + 1)
    )
    got = debiased_weights(sched, t, prediction_type)
    torch.testing.assert_close(got, want)
    assert torch.all(got[1:] > got[:-1])  # the noisier the step, the larger its weight


def test_training_applies_the_debiased_weights(train_cfg, monkeypatch) -> None:
    import sdtune.module
    from sdtune.train import train

    calls: list[torch.Tensor] = []

    def recorded(scheduler, timesteps, prediction_type):
        calls.append(timesteps)
        return debiased_weights(scheduler, timesteps, prediction_type)

    monkeypatch.setattr(sdtune.module, "debiased_weights", recorded)
    common = ["+experiment=lora", "data.num_images=4", "data.batch_size=2", "sampling.prompts=[]"]
    common += ["export.formats=[]", "logger=none", "runtime.threads=1", "trainer.max_steps=2"]
    train(train_cfg(*common, "loss.debiased_estimation=true", "loss.snr_gamma=5"))
    assert len(calls) == 2
