"""method.optimizer: sd-scripts' optimizer types, with method.optimizer_args (--optimizer_args)."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from sdtune.config import ConfigError, validate
from sdtune.optimizers import (
    OPTIMIZERS,
    build_optimizer,
    kohya_optimizer_name,
    optimizer_class,
    optimizer_kwargs,
)
from sdtune.train import train

COMMON = ["+experiment=lora", "data.num_images=4", "data.batch_size=2", "sampling.prompts=[]", "logger=none"]
COMMON += ["export.formats=[]", "runtime.threads=1", "trainer.max_steps=2", "method.lr=1e-3"]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_each_optimizer_trains_the_lora(train_cfg, name: str) -> None:
    run = train(train_cfg(*COMMON, f"method.optimizer={name}"))
    optimizer = run.trainer.optimizers[0]
    assert type(optimizer) is optimizer_class(name)
    for key, value in OPTIMIZERS[name][1].items():  # sd-scripts' fixed settings reach the constructor
        assert optimizer.defaults[key] == value
    moved = [p for n, p in run.module.unet.named_parameters() if "lora_B" in n and p.detach().abs().max() > 0]
    assert moved, f"{name}: no LoRA B matrix left zero after two steps"
    assert all(torch.isfinite(p).all() for p in moved)


def test_optimizer_args_reach_the_optimizer_and_the_kohya_header(train_cfg) -> None:
    run = train(train_cfg(*COMMON, "method.optimizer=lion", "method.optimizer_args={betas: [0.95, 0.98]}"))
    assert run.trainer.optimizers[0].defaults["betas"] == (0.95, 0.98)
    method = run.module.method
    assert kohya_optimizer_name(method) == "bitsandbytes.optim.Lion(betas=[0.95, 0.98])"


def test_adam_settings_go_only_to_the_adam_family() -> None:
    method = OmegaConf.create(
        {"optimizer": "adamw", "lr": 1e-4, "weight_decay": 0.01, "betas": [0.9, 0.999], "eps": 1e-8}
    )
    assert optimizer_kwargs(method) == {"lr": 1e-4, "weight_decay": 0.01, "betas": (0.9, 0.999), "eps": 1e-8}
    method.optimizer = "lion"  # keeps Lion's own betas (0.9, 0.99)
    assert optimizer_kwargs(method) == {"lr": 1e-4, "weight_decay": 0.01}
    method.optimizer_args = {"weight_decay": 0.1}  # overrides what the method gives
    assert optimizer_kwargs(method)["weight_decay"] == 0.1
    assert kohya_optimizer_name(method) == "bitsandbytes.optim.Lion(weight_decay=0.1)"


def test_optimizer_args_win_over_sdtunes_own_extras() -> None:
    method = OmegaConf.create(
        {"optimizer": "adamw", "lr": 1e-4, "weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1e-8}
    )
    weight = [{"params": [torch.nn.Parameter(torch.zeros(2))]}]
    assert build_optimizer(method, weight, foreach=True).defaults["foreach"] is True
    method.optimizer_args = {"foreach": False}  # the user's choice, not a duplicate-argument TypeError
    assert build_optimizer(method, weight, foreach=True).defaults["foreach"] is False


def test_bad_optimizer_settings_are_named_before_training(train_cfg) -> None:
    with pytest.raises(ConfigError) as info:
        validate(train_cfg("+experiment=lora", "method.optimizer=dadaptation"))
    expected = "method.optimizer: 'dadaptation' is not one of adamw, adamw8bit, paged_adamw8bit, lion"
    assert expected in str(info.value)
    bad_args = ["method.optimizer=adafactor", "method.optimizer_args={beta: 0.9}"]
    with pytest.raises(ConfigError) as info:
        validate(train_cfg("+experiment=lora", *bad_args))
    message = str(info.value)
    assert "method.optimizer_args: transformers.optimization.Adafactor takes no ['beta']" in message
    assert "'beta1'" in message  # what it does take is listed
    bad_values = ["method.optimizer=lion", "method.optimizer_args={betas: [0.9, 1.5]}"]
    with pytest.raises(ConfigError, match=r"method.optimizer_args: bitsandbytes.optim.Lion refuses .*betas"):
        validate(train_cfg("+experiment=lora", *bad_values))
    with pytest.raises(ConfigError, match="method.optimizer_args: must be a mapping"):
        validate(train_cfg("+experiment=lora", "method.optimizer_args=0.9"))
