"""Conditioning components (the latent-diffusion paper's τθ) and the stack that combines them.

A component declares the slot it feeds: `crossattn` (tokens of the U-Net's cross-attention width, concatenated
along the token axis when several are active) or `concat` (channels at latent resolution, concatenated
with the noisy latent; such a component also declares `channels`). The training module does not care which
kind a component is. A component that also feeds the U-Net's `added_cond_kwargs` (SDXL text: pooled
embedding and micro-conditioning time ids) returns (tokens, {name: tensor}). A component may also
declare `input` (the `sdtune.sample` key that feeds it, e.g. `map`,
read by its `read_input(path, resolution)`) and `visualize(batch) -> list[PIL.Image]` (shown beside each
validation sample).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import Tensor, nn

SLOTS = ("crossattn", "concat")


@dataclass
class Conditions:
    """What the U-Net receives besides the noisy latent."""

    crossattn: Tensor | None = None
    concat: Tensor | None = None
    added: dict[str, Tensor] | None = None  # SDXL: the U-Net's added_cond_kwargs (text_embeds, time_ids)

    def unet_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the U-Net call besides its input and timestep."""
        kwargs: dict[str, Any] = {"encoder_hidden_states": self.crossattn}
        if self.added is not None:
            kwargs["added_cond_kwargs"] = self.added
        return kwargs

    def select(self, mask: Tensor) -> Conditions:
        """The conditions of the samples marked in `mask`."""

        def rows(tensor: Tensor | None) -> Tensor | None:
            return None if tensor is None else tensor[mask.to(tensor.device)]

        added = None if self.added is None else {k: rows(v) for k, v in self.added.items()}
        return Conditions(crossattn=rows(self.crossattn), concat=rows(self.concat), added=added)

    def unet_input(self, noisy_latents: Tensor) -> Tensor:
        if self.concat is None:
            return noisy_latents
        return torch.cat([noisy_latents, self.concat.to(noisy_latents.dtype)], dim=1)


class ConditioningStack(nn.Module):
    """Named conditioning components; each call returns the combined `Conditions`."""

    def __init__(self, components: dict[str, nn.Module]) -> None:
        super().__init__()
        for name, component in components.items():
            if getattr(component, "slot", None) not in SLOTS:
                raise ValueError(f"conditioning.{name}: component must declare slot 'crossattn' or 'concat'")
        self.components = nn.ModuleDict(components)

    def train_widened_input(self, unet: Any) -> None:
        """With concat conditions the widened `conv_in` trains too (call again after a method froze it)."""
        if self.concat_channels:
            unet.conv_in.requires_grad_(True)

    def forward(self, batch: dict[str, Any], drop: dict[str, Tensor]) -> Conditions:
        """Encode `batch`; samples marked in `drop[name]` get that component's null condition."""
        outputs: dict[str, list[Tensor]] = {slot: [] for slot in SLOTS}
        added: dict[str, Tensor] = {}
        for name, component in self.components.items():
            output = component(batch, drop[name])
            if isinstance(output, tuple):
                output, extra = output
                added.update(extra)
            outputs[component.slot].append(output)
        return Conditions(
            crossattn=torch.cat(outputs["crossattn"], dim=1) if outputs["crossattn"] else None,
            concat=torch.cat(outputs["concat"], dim=1) if outputs["concat"] else None,
            added=added or None,
        )

    def training_drop(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Per-component random drop masks for classifier-free guidance training."""
        return {
            name: torch.rand(batch_size, generator=generator) < float(component.dropout)
            for name, component in self.components.items()
        }

    @staticmethod
    def all_dropped(drop: dict[str, Tensor]) -> Tensor:
        """The samples that `drop` leaves with no condition at all (what classifier-free guidance's
        unconditional branch sees)."""
        return torch.stack(list(drop.values())).all(dim=0)

    def constant_drop(self, batch_size: int, value: bool) -> dict[str, Tensor]:
        return {name: torch.full((batch_size,), value) for name in self.components}

    def keep_only(self, batch_size: int, kept: set[str]) -> dict[str, Tensor]:
        """Drop masks that keep the components named in `kept` and drop every other one."""
        return {name: torch.full((batch_size,), name not in kept) for name in self.components}

    @property
    def inputs(self) -> list[str]:
        """What the components take besides the caption (e.g. `map`), as named by their `input`."""
        return [c.input for c in self.components.values() if getattr(c, "input", None)]

    @property
    def concat_channels(self) -> int:
        """How many channels the concat slot adds to the U-Net input."""
        return sum(int(c.channels) for c in self.components.values() if c.slot == "concat")

    def visualize(self, batch: dict[str, Any]) -> list[list[Any]]:
        """Per sample, the PIL images of the conditions that can be shown (e.g. a colourised map)."""
        columns = [c.visualize(batch) for c in self.components.values() if hasattr(c, "visualize")]
        return [list(row) for row in zip(*columns)] if columns else []


def build_conditioning(cfg: DictConfig, stack: Any) -> ConditioningStack:
    """Instantiate every component under the `conditioning` config group against the loaded stack.

    Concat components widen the U-Net's input convolution (zero-initialised new channels, so the model starts
    exactly where it was); the widened `conv_in` then trains with whatever method the run uses.
    """
    from sdtune.models.expand import expand_unet_input

    conditioning = ConditioningStack(
        # Partial first: Hydra would turn the Stack dataclass into a config copy, detaching its dicts.
        {name: instantiate(component, _partial_=True)(stack=stack) for name, component in cfg.items()}
    )
    if conditioning.concat_channels:
        expand_unet_input(stack.unet, stack.vae.config.latent_channels + conditioning.concat_channels)
        conditioning.train_widened_input(stack.unet)
    return conditioning
