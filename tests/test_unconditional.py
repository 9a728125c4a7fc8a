"""`method.preserve_unconditional`: caption-dropped samples learn the frozen base's prediction."""

from __future__ import annotations

import pytest
import torch

from sdtune.conditioning.text import with_micro_conditioning
from sdtune.config import ConfigError, validate

PRESERVE = "method.preserve_unconditional=true"


def lora_module(train_cfg, cache_dir, *overrides: str):
    from sdtune.conditioning import build_conditioning
    from sdtune.models import load_stack
    from sdtune.models.adapters import apply_method
    from sdtune.module import DiffusionModule

    cfg = train_cfg("method=lora", "method.train_text_encoder=true", *overrides)
    stack = load_stack(cfg.model, cache_dir)
    apply_method(stack, cfg.method)
    return DiffusionModule(stack, build_conditioning(cfg.conditioning, stack), cfg.method, cfg.loss)


def losses_with_drop(module, drop: list[bool]) -> torch.Tensor:
    """Per-sample losses of one batch whose caption is dropped where `drop` says."""
    torch.manual_seed(0)
    batch = {"pixel_values": torch.rand(len(drop), 3, 64, 64) * 2 - 1, "caption": ["a red star"] * len(drop)}
    latents = module.batch_latents(batch)
    batch = with_micro_conditioning(batch, len(drop), 64, 64)
    masks = {"text": torch.tensor(drop)}
    conditions = module.conditioning(batch, masks)
    unconditional = module.base_unconditional(batch, masks) if module.preserve_unconditional else None
    return module.per_sample_loss(latents, conditions, unconditional)


def lora_b(module) -> list[torch.nn.Parameter]:
    return [p for name, p in module.named_parameters() if "lora_B" in name]


def test_dropped_samples_target_the_base_and_the_others_their_image(train_cfg, cache_dir) -> None:
    module = lora_module(train_cfg, cache_dir, PRESERVE)
    # Fresh LoRA B matrices are zero: the model is the base, so a dropped sample's loss is 0 (up to the
    # rounding of a smaller batch's forward).
    losses = losses_with_drop(module, [True, False, True, False])
    assert losses[[0, 2]].abs().max() < 1e-10
    assert (losses[[1, 3]] > 1e-4).all()

    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for p in lora_b(module):
            p.normal_(std=0.05)
    losses = losses_with_drop(module, [True, True])
    assert (losses > 0).all(), "an adapter that moves the unconditional output must be pulled back"
    losses.mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b(module))
    # The base forward switched the adapters off and on again: trainable set and adapter effect unchanged.
    assert {name for name, p in module.named_parameters() if p.requires_grad} == trainable
    torch.testing.assert_close(losses_with_drop(module, [True, True]), losses.detach())


def test_sdxl_dropped_samples_target_the_base_too(train_cfg, cache_dir) -> None:
    """SDXL's added conditions (pooled text, size ids) are selected for the dropped rows as well."""
    module = lora_module(train_cfg, cache_dir, "model=tiny_xl", PRESERVE)
    losses = losses_with_drop(module, [False, True, True])
    assert losses[1:].abs().max() < 1e-10 and losses[0] > 1e-4


def test_without_it_dropped_samples_learn_their_image(train_cfg, cache_dir) -> None:
    module = lora_module(train_cfg, cache_dir)
    assert (losses_with_drop(module, [True, True]) > 1e-4).all()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method=full", f"+{PRESERVE}"], "method=lora"),
        ([PRESERVE, "conditioning.text.dropout=0"], "conditioning.<name>.dropout > 0"),
        ([PRESERVE, "loss.prediction_type=v_prediction"], "leave loss.prediction_type null"),
        (["method.preserve_unconditional=sometimes"], "must be true or false"),
    ],
)
def test_settings_it_cannot_work_with_are_refused(train_cfg, overrides, message) -> None:
    with pytest.raises(ConfigError, match="method.preserve_unconditional") as error:
        validate(train_cfg(*overrides))
    assert message in str(error.value)
    validate(train_cfg(PRESERVE))
