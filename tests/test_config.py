from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigAttributeError

from sdtune.config import ConfigError, validate

from .conftest import CONF_DIR

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


def test_train_config_has_the_public_groups(train_cfg) -> None:
    cfg = train_cfg()
    for group in ("model", "method", "data", "conditioning", "trainer", "logger", "callbacks", "paths"):
        assert group in cfg, group
    for key in ("pretrained",):
        assert key in cfg.model
    for key in ("rank", "alpha", "target_modules"):
        assert key in cfg.method
    for key in ("root", "resolution", "batch_size"):
        assert key in cfg.data
    for key in ("max_steps", "accelerator", "devices"):
        assert key in cfg.trainer
    assert "resume" in cfg and cfg.hydra.run.dir


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(train_cfg, experiment: str, tmp_path: Path) -> None:
    required = []
    if experiment == "pretrain":  # stage two starts from a stage-one run directory
        (tmp_path / "vae_run" / "pipeline").mkdir(parents=True)
        required.append(f"vae_run={tmp_path / 'vae_run'}")
    cfg = train_cfg(f"+experiment={experiment}", *required)
    validate(cfg)


@pytest.mark.parametrize("model", MODELS)
def test_model_configs_compose(train_cfg, model: str) -> None:
    cfg = train_cfg(f"model={model}")
    assert cfg.data.resolution == cfg.model.resolution


@pytest.mark.parametrize("model", ["sdxl", "tiny_xl"])
def test_sdxl_validates_and_refuses_what_it_lacks_clearly(train_cfg, model: str) -> None:
    validate(train_cfg(f"model={model}", "export.formats=[diffusers,kohya,peft,merged,single_file]"))
    validate(train_cfg(f"model={model}", "data.cache_latents=true"))
    with pytest.raises(ConfigError) as info:
        validate(train_cfg(f"model={model}", "data=semantic", "+experiment=textual_inversion"))
    assert "data=semantic" in str(info.value) and "textual inversion for SDXL" in str(info.value)


def test_bad_values_are_all_reported_at_once(train_cfg, tmp_path: Path) -> None:
    cfg = train_cfg(
        "method.rank=0",
        "sampling.scheduler=plms",
        f"model.pretrained={tmp_path}/missing.safetensors",
        "data.resolution=65",
        "trainer.max_steps=0",
        "loss.prediction_type=x0",
        f"resume={tmp_path}/nope",
        "loss.timestep_bias.strategy=middle",
        "export.dtype=half",
    )
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    message = str(info.value)
    assert len(info.value.problems) == 9, message
    for key in (
        "method.rank",
        "sampling.scheduler",
        "model.pretrained",
        "data.resolution",
        "trainer.max_steps",
        "loss.prediction_type",
        "resume",
        "loss.timestep_bias.strategy",
        "export.dtype",
    ):
        assert key in message
    assert "euler_a" in message  # the valid scheduler names are listed


def test_captions_without_root_is_reported(train_cfg) -> None:
    with pytest.raises(ConfigError, match="data.root"):
        validate(train_cfg("data=captions"))


def test_unknown_key_is_rejected(train_cfg) -> None:
    with pytest.raises(ConfigCompositionException):
        train_cfg("method.rnak=4")
    with pytest.raises(ConfigAttributeError):
        _ = train_cfg().method.rnak


# Each of these failed deep in Lightning, torch or sdtune's own checks with a TypeError traceback.
WRONG_TYPES = [
    ("method.lr", "x", "a positive number"),
    ("method.dropout", "x", "a number in [0, 1)"),
    ("method.weight_decay", "x", "a number >= 0"),
    ("method.eps", "x", "a positive number"),
    ("method.betas", "x", "two numbers in [0, 1)"),
    ("method.lr_warmup_steps", "1.5", "an integer >= 0"),
    ("data.num_images", "x", "an integer >= 1"),
    ("data.num_workers", "x", "an integer >= 0"),
    ("data.seed", "x", "an integer"),
    ("loss.noise_offset", "x", "a number >= 0"),
    ("loss.snr_gamma", "x", "a positive number or null"),
    ("trainer.precision", "bf17", "is not one of 32-true, bf16-mixed, bf16-true"),
    ("trainer.accumulate_grad_batches", "x", "an integer >= 1"),
    ("trainer.gradient_clip_val", "x", "a number >= 0 or null"),
    ("trainer.devices", "x", "auto, an integer >= 1 or a list"),
    ("callbacks.checkpoint.every_n_train_steps", "x", "an integer >= 0 or null"),
    ("sampling.guidance", "x", "a number >= 0"),
    ("sampling.guidance_rescale", "1.5", "a number in [0, 1]"),
    ("evaluation.guidance_rescale", "x", "a number in [0, 1]"),
    ("sampling.every_n_steps", "x", "an integer >= 0"),
    ("evaluation.per_prompt", "0", "an integer >= 1"),
    ("data.cache_latents", "yes", "true or false"),
    ("method.train_text_encoder", "1", "true or false"),
]


@pytest.mark.parametrize(("key", "value", "expected"), WRONG_TYPES, ids=[k for k, _, _ in WRONG_TYPES])
def test_a_value_of_the_wrong_type_is_named_with_what_it_must_be(train_cfg, key, value, expected) -> None:
    with pytest.raises(ConfigError) as info:
        validate(train_cfg("+experiment=lora", f"{key}={value}"))
    assert any(p.startswith(f"{key}:") and expected in p for p in info.value.problems), info.value.problems


def test_the_shipped_values_of_the_numeric_keys_pass(train_cfg) -> None:
    for devices in ("auto", "2", "[0,1]", "'0,1'"):
        validate(train_cfg("+experiment=lora", "trainer.accelerator=cpu", f"trainer.devices={devices}"))
    validate(train_cfg("+experiment=lora", "trainer.gradient_clip_val=null", "method.betas=[0.9,0.99]"))
