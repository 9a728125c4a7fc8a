"""LoRA+ (method.loraplus_lr_ratio): LoRA's B matrices step at lr × ratio, everything else at lr."""

from __future__ import annotations

import pytest
import torch

from sdtune.config import ConfigError, validate
from sdtune.train import train

COMMON = ["+experiment=lora", "data.num_images=4", "data.batch_size=2", "sampling.prompts=[]", "logger=none"]
COMMON += ["export.formats=[]", "runtime.threads=1", "trainer.max_steps=1", "method.lr_scheduler=constant"]
COMMON += ["method.train_text_encoder=true", "method.lr=1e-4", "method.text_encoder_lr=5e-5"]


def test_the_b_matrices_learn_ratio_times_faster(train_cfg) -> None:
    run = train(train_cfg(*COMMON, "method.loraplus_lr_ratio=16"))
    groups = run.trainer.optimizers[0].param_groups
    assert [g["lr"] for g in groups] == pytest.approx([1e-4, 16e-4, 5e-5, 80e-5])
    named = {id(p): n for n, p in run.module.named_parameters()}
    for group in groups:
        names = [named[id(p)] for p in group["params"]]
        fast = group["lr"] in (pytest.approx(16e-4), pytest.approx(80e-5))
        assert names and all(("lora_B" in n) == fast for n in names), (group["lr"], names[:3])
    # AdamW's first step moves a weight by at most lr (lr · g / (|g| + eps)): B, zero at the start, by 16e-4.
    unet_b = [p for n, p in run.module.unet.named_parameters() if "lora_B" in n]
    values = torch.cat([p.detach().abs().flatten() for p in unet_b])
    assert float(values.max()) == pytest.approx(16e-4, rel=1e-3)


def test_loraplus_needs_b_matrices(train_cfg) -> None:
    validate(train_cfg("+experiment=lora", "method.loraplus_lr_ratio=16", "method.variant=dora"))
    with pytest.raises(ConfigError, match=r"loraplus_lr_ratio: LoRA\+ speeds up .*method.variant=loha"):
        validate(train_cfg("+experiment=lora", "method.loraplus_lr_ratio=16", "method.variant=loha"))
    with pytest.raises(ConfigError, match=r"method.loraplus_lr_ratio: must be a positive number"):
        validate(train_cfg("+experiment=lora", "method.loraplus_lr_ratio=0"))
