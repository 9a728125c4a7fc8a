"""Widening the U-Net's input convolution for concat conditioning (semantic maps, source-image latents)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sdtune.config import ConfigError


def expand_unet_input(unet: Any, in_channels: int) -> bool:
    """Give `unet.conv_in` `in_channels` inputs; returns whether it was widened.

    The existing input channels keep their weights and the new ones start at zero, so the widened U-Net gives
    exactly the original output whatever the extra channels hold. `unet.config.in_channels` is updated, so a
    saved pipeline reloads with the new shape. A U-Net that already has `in_channels` (an exported sdtune
    pipeline, an InstructPix2Pix base model) is left as it is.
    """
    current = unet.config.in_channels
    if current == in_channels:
        return False
    if current > in_channels:
        raise ConfigError(
            [
                f"conditioning: the U-Net takes {current} input channels but the latent and the concat "
                f"conditions make {in_channels}; choose conditioning components that match this base model"
            ]
        )
    old = unet.conv_in
    new = nn.Conv2d(
        in_channels,
        old.out_channels,
        old.kernel_size,
        old.stride,
        old.padding,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :current] = old.weight
        new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=in_channels)
    return True
