"""What trains: each method prepares the loaded (frozen) stack for its kind of fine-tuning."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf

ADAPTER_NAME = "default"


def lora_config(method: DictConfig, target_modules: list[str], rank: int) -> Any:
    """A peft LoraConfig from the `method` config group."""
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=method.alpha,
        lora_dropout=method.dropout,
        use_rslora=method.use_rslora,
        init_lora_weights="gaussian",
        target_modules=list(OmegaConf.to_container(target_modules, resolve=True)),
    )


def apply_lora(stack: Any, method: DictConfig) -> None:
    """Add peft LoRA adapters to the U-Net (and the text encoder if asked); only they train."""
    stack.unet.add_adapter(lora_config(method, method.target_modules, method.rank), adapter_name=ADAPTER_NAME)
    if method.train_text_encoder:
        config = lora_config(method, method.text_encoder_target_modules, method.text_encoder_rank)
        add_adapter(stack.text_encoder, config)


def add_adapter(model: Any, config: Any) -> None:
    """Inject a peft adapter into a transformers model and record its config where peft's helpers look.

    transformers' own `add_adapter` demands a newer peft than diffusers needs; peft's injection is the same.
    """
    from peft import inject_adapter_in_model

    inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    model.peft_config = {ADAPTER_NAME: config}


def apply_full(stack: Any, method: DictConfig) -> None:
    """All U-Net weights train, the text encoder's with `method.train_text_encoder`; the VAE stays frozen."""
    stack.unet.requires_grad_(True)
    if method.gradient_checkpointing:
        stack.unet.enable_gradient_checkpointing()
    if method.train_text_encoder:
        stack.text_encoder.requires_grad_(True)
        if method.gradient_checkpointing:
            stack.text_encoder.gradient_checkpointing_enable()


METHODS: dict[str, Callable[[Any, DictConfig], None]] = {"lora": apply_lora, "full": apply_full}


def apply_method(stack: Any, method: DictConfig) -> None:
    """Make the parameters that `method` trains trainable (everything else stays frozen)."""
    METHODS[method.name](stack, method)


def adapter_config(model: Any) -> Any | None:
    """The peft config of `model`'s adapter, or None if it has none."""
    return getattr(model, "peft_config", {}).get(ADAPTER_NAME)
