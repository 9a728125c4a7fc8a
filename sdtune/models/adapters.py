"""What trains: each method prepares the loaded (frozen) stack for its kind of fine-tuning."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from sdtune.models.textual_inversion import apply_textual_inversion

ADAPTER_NAME = "default"


VARIANTS = ("lora", "dora", "loha", "lokr")


def adapter_peft_config(
    method: DictConfig, target_modules: list[str], rank: int, layers: list[int] | None = None
) -> Any:
    """The peft config of `method.variant` (LoRA, DoRA, LoHa or LoKr) from the `method` config group.

    `layers`: adapt only these transformer layers (`….layers.N.…`); None = all.
    """
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    targets = list(OmegaConf.to_container(target_modules, resolve=True))
    variant = method.get("variant", "lora")
    only = {"layers_to_transform": layers, "layers_pattern": "layers"} if layers is not None else {}
    if variant == "loha":
        return LoHaConfig(
            r=rank, alpha=method.alpha, module_dropout=method.dropout, target_modules=targets, **only
        )
    if variant == "lokr":
        return LoKrConfig(
            r=rank, alpha=method.alpha, module_dropout=method.dropout, target_modules=targets, **only
        )
    return LoraConfig(
        r=rank,
        lora_alpha=method.alpha,
        lora_dropout=method.dropout,
        use_rslora=method.use_rslora,
        use_dora=variant == "dora",
        init_lora_weights="gaussian",
        target_modules=targets,
        **only,
    )


def adapter_scale(config: Any) -> float:
    """The factor peft applies to an adapter's product: alpha / r (alpha / √r with rsLoRA)."""
    alpha = getattr(config, "lora_alpha", None) or getattr(config, "alpha", config.r)
    return alpha / (config.r**0.5 if getattr(config, "use_rslora", False) else config.r)


def apply_lora(stack: Any, method: DictConfig) -> None:
    """Add peft LoRA adapters to the U-Net (and the text encoders if asked); only they train."""
    config = adapter_peft_config(method, method.target_modules, method.rank)
    stack.unet.add_adapter(config, adapter_name=ADAPTER_NAME)
    if method.train_text_encoder:
        for encoder in stack.text_encoders:
            layers = _used_layers(stack, encoder)
            targets, rank = method.text_encoder_target_modules, method.text_encoder_rank
            add_adapter(encoder, adapter_peft_config(method, targets, rank, layers))
    if method.get("init_from"):
        load_initial_lora(stack, method.init_from)


def add_adapter(model: Any, config: Any) -> None:
    """Inject a peft adapter into a transformers model and record its config where peft's helpers look.

    transformers' own `add_adapter` demands a newer peft than diffusers needs; peft's injection is the same.
    """
    from peft import inject_adapter_in_model

    inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    model.peft_config = {ADAPTER_NAME: config}


@contextmanager
def adapters_disabled(*models: nn.Module) -> Iterator[None]:
    """Run `models` as the frozen base: every peft adapter layer in them is switched off, then back on (peft
    also clears and restores the adapters' requires_grad)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for model in models for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def apply_full(stack: Any, method: DictConfig) -> None:
    """All U-Net weights train, the text encoder's with `method.train_text_encoder`; the VAE stays frozen."""
    stack.unet.requires_grad_(True)
    if method.gradient_checkpointing:
        stack.unet.enable_gradient_checkpointing()
    if method.train_text_encoder:
        for encoder in stack.text_encoders:
            encoder.requires_grad_(True)
            for part in _unused_parts(stack, encoder):
                part.requires_grad_(False)
            if method.gradient_checkpointing:
                encoder.gradient_checkpointing_enable()


def _unused_parts(stack: Any, encoder: Any) -> list[Any]:
    """Parts of `encoder` that never get a gradient: SDXL conditions on text_encoder's penultimate hidden
    states, so its last layer and final norm stay frozen (DDP would otherwise wait for their gradients)."""
    if stack.text_encoder_2 is None or encoder is not stack.text_encoder:
        return []
    model = getattr(encoder, "text_model", encoder)
    return [model.encoder.layers[-1], model.final_layer_norm]


def _used_layers(stack: Any, encoder: Any) -> list[int] | None:
    """The transformer layers of `encoder` worth adapting: all (None) but those `_unused_parts` names."""
    if not _unused_parts(stack, encoder):
        return None
    return list(range(encoder.config.num_hidden_layers - 1))


def apply_vae(stack: Any, method: DictConfig) -> None:
    """`method.parts`: `all` trains E and D; `decoder` only D (and its post-quant conv), as Stability's
    ft-MSE VAEs were made: the latents do not change, so a U-Net trained on them keeps working."""
    decoder_only = method.get("parts", "all") == "decoder"
    stack.vae.requires_grad_(not decoder_only)
    if decoder_only:
        stack.vae.decoder.requires_grad_(True)
        stack.vae.post_quant_conv.requires_grad_(True)


METHODS: dict[str, Callable[[Any, DictConfig], None]] = {
    "lora": apply_lora,
    "full": apply_full,
    "textual_inversion": apply_textual_inversion,
    "vae": apply_vae,  # autoencoder pretraining (stage one), or its decoder alone
}


def apply_method(stack: Any, method: DictConfig) -> None:
    """Make the parameters that `method` trains trainable (everything else stays frozen)."""
    METHODS[method.name](stack, method)


def apply_noise_schedule(stack: Any, method: DictConfig, loss: DictConfig) -> None:
    """Give the stack the noise schedule a run trains with: zero terminal SNR (`method.zero_terminal_snr`) and
    the prediction type (`loss.prediction_type`, when it overrides the base's). Training-time samples,
    `sdtune.sample` of the run and the exported pipelines' schedulers are all configured from it, so a
    v-prediction LoRA over an epsilon base is sampled as v-prediction."""
    if method.get("zero_terminal_snr"):
        stack.noise_scheduler = zero_terminal_snr_scheduler(stack.noise_scheduler)
    wanted = loss.get("prediction_type")
    if wanted and wanted != stack.noise_scheduler.config.prediction_type:
        scheduler = stack.noise_scheduler
        stack.noise_scheduler = type(scheduler).from_config(scheduler.config, prediction_type=wanted)


def zero_terminal_snr_scheduler(scheduler: Any) -> Any:
    """The same scheduler with betas rescaled to zero terminal SNR (Lin et al. 2023) and trailing timesteps.

    Sampling schedulers are configured from this config, so they get the matching settings.
    """
    return type(scheduler).from_config(
        scheduler.config, rescale_betas_zero_snr=True, timestep_spacing="trailing"
    )


def adapter_config(model: Any) -> Any | None:
    """The peft config of `model`'s adapter, or None if it has none."""
    return getattr(model, "peft_config", {}).get(ADAPTER_NAME)


def read_lora_file(path: str, models: dict[str, Any], family: str = "sd1") -> dict[str, dict[str, Any]]:
    """peft-keyed tensors of a kohya or diffusers LoRA file per model it adapts (`unet`, `text_encoder`,
    SDXL's `text_encoder_2`), rescaled so that the adapters the `models` already carry (their own alpha and
    rank) reproduce the file exactly."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    from sdtune.formats.kohya import kohya_to_peft_parts

    state = load_file(path)
    if all(k.startswith(("lora_unet_", "lora_te")) for k in state):
        parts, rank, alpha = kohya_to_peft_parts(state, models, family)
        return {part: _rescaled(tensors, alpha / rank, models[part]) for part, tensors in parts.items()}
    parts = {
        part: {k.removeprefix(f"{part}."): v for k, v in state.items() if k.startswith(f"{part}.")}
        for part in models
    }
    if not parts.get("unet") or sum(len(tensors) for tensors in parts.values()) != len(state):
        raise ValueError(f"method.init_from: {path} is neither a kohya nor a diffusers LoRA file")
    with safe_open(path, "pt") as f:
        metadata = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
    return {
        part: _rescaled(tensors, _scale(metadata, part), models[part])
        for part, tensors in parts.items()
        if tensors
    }


def _scale(metadata: dict[str, Any], part: str) -> float | None:
    """The LoRA scale a diffusers file's adapter metadata records (None: scale 1, as diffusers assumes)."""
    rank, alpha = metadata.get(f"{part}.r"), metadata.get(f"{part}.lora_alpha")
    if rank is None or alpha is None:
        return None
    return alpha / (rank**0.5 if metadata.get(f"{part}.use_rslora") else rank)


def _rescaled(tensors: dict[str, Any] | None, file_scale: float | None, model: Any) -> dict[str, Any] | None:
    config = adapter_config(model)
    if not tensors or config is None:
        return tensors
    factor = (1.0 if file_scale is None else file_scale) / adapter_scale(config)
    return {k: v * factor if "lora_B" in k else v for k, v in tensors.items()}


def load_initial_lora(stack: Any, path: str) -> None:
    """Start training from an existing LoRA: its tensors replace the fresh adapter's, shapes checked."""
    models = {"unet": stack.unet, "text_encoder": stack.text_encoder}
    if stack.text_encoder_2 is not None:
        models["text_encoder_2"] = stack.text_encoder_2
    for part, tensors in read_lora_file(path, models, stack.family).items():
        if adapter_config(models[part]) is None:
            raise ValueError(
                f"method.init_from: {path} has {part.replace('_', ' ')} LoRA weights; set "
                "method.train_text_encoder=true to train them too"
            )
        _load_adapter_tensors(models[part], tensors, path, part.replace("_", " "))


def _load_adapter_tensors(model: Any, tensors: dict[str, Any], path: str, what: str) -> None:
    import torch

    params = {_peft_key(name): p for name, p in model.named_parameters() if "lora_" in name}
    for key, value in tensors.items():
        if key not in params:
            raise ValueError(
                f"method.init_from: {path}: {what} key {key!r} has no matching LoRA module; "
                "add its module to method.target_modules"
            )
        if params[key].shape != value.shape:
            raise ValueError(
                f"method.init_from: {path}: {what} key {key!r} has shape {tuple(value.shape)} but the "
                f"adapter expects {tuple(params[key].shape)}; set method.rank to the file's rank, or check"
                " that the LoRA was trained for this base model"
            )
    with torch.no_grad():
        for key, value in tensors.items():
            params[key].copy_(value)


def _peft_key(name: str) -> str:
    return name.replace(f".{ADAPTER_NAME}.", ".")
