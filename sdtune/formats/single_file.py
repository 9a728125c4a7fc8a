"""A diffusers SD1.x/SD2.x/SDXL pipeline as one checkpoint in the original (CompVis/ldm, or sgm) layout.

This is the file A1111 and ComfyUI load as a "checkpoint" and diffusers reads with
`StableDiffusionPipeline.from_single_file`. It holds the U-Net under `model.diffusion_model.`, the VAE under
`first_stage_model.` and the text encoder under `cond_stage_model.transformer.text_model.` (SD1.x, OpenAI
CLIP) or `cond_stage_model.model.` (SD2.x, OpenCLIP). SDXL (Stability's generative-models layout) has the same
U-Net layout plus `label_emb` (the added-conditioning MLP) and its two text encoders under
`conditioner.embedders.0.transformer.text_model.` (OpenAI CLIP) and `conditioner.embedders.1.model.`
(OpenCLIP, with its `text_projection` stored as [width, projection], i.e. transposed).

Every mapping is derived from the model's config (levels, layers per block, which levels have attention),
so the same code writes the real models and the small test stacks. Each source tensor is written exactly
once; a tensor the mapping does not know (a LoRA layer, an unknown embedding) raises, never vanishes.

SD2.x text encoders: diffusers keeps 23 of OpenCLIP ViT-H's 24 blocks (SD2 conditions on the penultimate
block) and has no `text_projection`, so the file holds neither; loaders that read SD2 checkpoints load it
without them (diffusers ignores both keys), and strict loaders would report them missing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import save_file

from sdtune.io import atomic_path

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
FAMILIES = ("sd1", "sd2", "sdxl")

StateDict = dict[str, torch.Tensor]

_UNET_DOWN_TYPES = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
_UNET_UP_TYPES = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
_UNET_MID_TYPE = "UNetMidBlock2DCrossAttn"
# diffusers' ResNet block names -> the original (SGM / LDM) U-Net's; kohya's LoRA names use them too
UNET_RESNET_SGM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_CLIP_ROOTS = ("embeddings.", "encoder.", "final_layer_norm.")
_OPEN_CLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_CLIP_LAYER_KEY = re.compile(r"^encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_ADAPTER_MARKERS = (".base_layer.", "lora_", ".lokr_", ".hada_")


class _Target(NamedTuple):
    """Where a diffusers module goes in the ldm layout."""

    ldm: str
    renames: Mapping[str, str] | None = None  # submodule renames; None: submodule names are the same
    conv1x1: bool = False  # linear weights become [out, in, 1, 1] 1x1-conv weights


def _per_level(value: int | Sequence[int], levels: int) -> list[int]:
    """`layers_per_block` as one count per level (diffusers allows an int or a per-level list)."""
    return [int(value)] * levels if isinstance(value, int) else [int(v) for v in value]


def _has_attention(block_type: str, known: Mapping[str, bool]) -> bool:
    """Whether a U-Net block type carries cross-attention; raise for types SD1.x/SD2.x never use."""
    if block_type not in known:
        raise ValueError(f"single-file export: U-Net block type {block_type!r} is not one of {sorted(known)}")
    return known[block_type]


def _check_unet_config(config: Mapping[str, Any]) -> None:
    """Refuse U-Nets whose original layout this module does not write (upscalers, other mid blocks)."""
    if config.get("addition_embed_type") not in (None, "text_time"):
        raise ValueError("single-file export: only SDXL's text_time added conditioning is supported")
    if config.get("class_embed_type") is not None or config.get("num_class_embeds") is not None:
        raise ValueError("single-file export: U-Nets with class embeddings (x4 upscaler) are not supported")
    if config.get("mid_block_type", _UNET_MID_TYPE) != _UNET_MID_TYPE:
        raise ValueError(f"single-file export: U-Net mid block must be {_UNET_MID_TYPE}")
    if len(config["down_block_types"]) != len(config["up_block_types"]):
        raise ValueError("single-file export: U-Net down and up block counts differ")


def _unet_targets(config: Mapping[str, Any]) -> dict[str, _Target]:
    """diffusers U-Net module path -> ldm input/middle/output block path, derived from the config."""
    _check_unet_config(config)
    targets = {
        "time_embedding.linear_1": _Target("time_embed.0"),
        "time_embedding.linear_2": _Target("time_embed.2"),
        "conv_in": _Target("input_blocks.0.0"),
        "mid_block.resnets.0": _Target("middle_block.0", UNET_RESNET_SGM),
        "mid_block.attentions.0": _Target("middle_block.1"),
        "mid_block.resnets.1": _Target("middle_block.2", UNET_RESNET_SGM),
        "conv_norm_out": _Target("out.0"),
        "conv_out": _Target("out.2"),
    }
    if config.get("addition_embed_type") == "text_time":  # SDXL
        targets["add_embedding.linear_1"] = _Target("label_emb.0.0")
        targets["add_embedding.linear_2"] = _Target("label_emb.0.2")
    down_types, up_types = config["down_block_types"], config["up_block_types"]
    levels = len(down_types)
    layers = _per_level(config["layers_per_block"], levels)
    # ldm numbers input/output blocks consecutively: one per resnet (+ its attention), one per resampler.
    index = 1
    for level, block_type in enumerate(down_types):
        attention = _has_attention(block_type, _UNET_DOWN_TYPES)
        for j in range(layers[level]):
            targets[f"down_blocks.{level}.resnets.{j}"] = _Target(f"input_blocks.{index}.0", UNET_RESNET_SGM)
            if attention:
                targets[f"down_blocks.{level}.attentions.{j}"] = _Target(f"input_blocks.{index}.1")
            index += 1
        if level < levels - 1:
            targets[f"down_blocks.{level}.downsamplers.0.conv"] = _Target(f"input_blocks.{index}.0.op")
            index += 1
    index = 0
    for level, (block_type, count) in enumerate(zip(up_types, reversed(layers), strict=True)):
        attention = _has_attention(block_type, _UNET_UP_TYPES)
        for j in range(count + 1):
            targets[f"up_blocks.{level}.resnets.{j}"] = _Target(f"output_blocks.{index}.0", UNET_RESNET_SGM)
            if attention:
                targets[f"up_blocks.{level}.attentions.{j}"] = _Target(f"output_blocks.{index}.1")
            index += 1
        if level < levels - 1:
            # The upsampler is appended to the level's last output block, after its attention if any.
            ldm = f"output_blocks.{index - 1}.{2 if attention else 1}.conv"
            targets[f"up_blocks.{level}.upsamplers.0.conv"] = _Target(ldm)
    return targets


def _vae_targets(config: Mapping[str, Any]) -> dict[str, _Target]:
    """diffusers AutoencoderKL module path -> ldm encoder/decoder path, from the config."""
    targets = {name: _Target(name) for name in ("quant_conv", "post_quant_conv")}
    for side in ("encoder", "decoder"):
        targets[f"{side}.conv_in"] = _Target(f"{side}.conv_in")
        targets[f"{side}.conv_norm_out"] = _Target(f"{side}.norm_out")
        targets[f"{side}.conv_out"] = _Target(f"{side}.conv_out")
        targets[f"{side}.mid_block.resnets.0"] = _Target(f"{side}.mid.block_1", _VAE_RESNET)
        targets[f"{side}.mid_block.attentions.0"] = _Target(f"{side}.mid.attn_1", _VAE_ATTENTION, True)
        targets[f"{side}.mid_block.resnets.1"] = _Target(f"{side}.mid.block_2", _VAE_RESNET)
    down_levels, up_levels = len(config["down_block_types"]), len(config["up_block_types"])
    layers = int(config["layers_per_block"])
    for level in range(down_levels):
        block, ldm = f"encoder.down_blocks.{level}", f"encoder.down.{level}"
        for j in range(layers):
            targets[f"{block}.resnets.{j}"] = _Target(f"{ldm}.block.{j}", _VAE_RESNET)
        if level < down_levels - 1:
            targets[f"{block}.downsamplers.0.conv"] = _Target(f"{ldm}.downsample.conv")
    for level in range(up_levels):
        # ldm numbers decoder levels from the highest resolution, diffusers from the lowest.
        block, ldm = f"decoder.up_blocks.{level}", f"decoder.up.{up_levels - 1 - level}"
        for j in range(layers + 1):
            targets[f"{block}.resnets.{j}"] = _Target(f"{ldm}.block.{j}", _VAE_RESNET)
        if level < up_levels - 1:
            targets[f"{block}.upsamplers.0.conv"] = _Target(f"{ldm}.upsample.conv")
    return targets


def _find_target(key: str, targets: Mapping[str, _Target]) -> tuple[_Target, str] | None:
    """The longest module path of `key` that has a target, with the rest of the key; None if there is none."""
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):
        target = targets.get(".".join(parts[:n]))
        if target is not None:
            return target, ".".join(parts[n:])
    return None


def _ldm_key(target: _Target, rest: str) -> str | None:
    """The ldm key for `rest` (the key below the mapped module) under `target`; None if not renameable."""
    if target.renames is None:
        return f"{target.ldm}.{rest}"
    module, _, param = rest.rpartition(".")
    if module not in target.renames:
        return None
    return f"{target.ldm}.{target.renames[module]}.{param}"


def _check_plain(state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """Refuse state dicts that still carry adapter layers: their keys have no place in a checkpoint."""
    adapted = [key for key in state_dict if any(marker in key for marker in _ADAPTER_MARKERS)]
    if adapted:
        raise ValueError(
            f"single-file export: the {what} still has adapter layers (e.g. {adapted[0]!r}); merge them first"
        )


def _remap(
    state_dict: Mapping[str, torch.Tensor], targets: Mapping[str, _Target], prefix: str, what: str
) -> StateDict:
    """Rename every tensor through `targets` under `prefix`; raise if one is unmapped or two collide."""
    _check_plain(state_dict, what)
    out: StateDict = {}
    unmapped = []
    for key, tensor in state_dict.items():
        found = _find_target(key, targets)
        ldm_key = _ldm_key(*found) if found is not None else None
        if ldm_key is None:
            unmapped.append(key)
            continue
        if found[0].conv1x1 and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        _put(out, prefix + ldm_key, tensor, key)
    if unmapped:
        raise ValueError(f"single-file export: {what} tensor(s) with no original-layout name: {unmapped[:5]}")
    return out


def _put(out: StateDict, key: str, tensor: torch.Tensor, source: str) -> None:
    """Store `tensor` at `key`, refusing to overwrite: two sources for one key means the mapping is wrong."""
    if key in out:
        raise ValueError(f"single-file export: {source!r} maps onto {key!r}, which is already taken")
    out[key] = tensor


def unet_to_ldm(unet_state_dict: Mapping[str, torch.Tensor], unet_config: Mapping[str, Any]) -> StateDict:
    """An SD1.x/SD2.x `UNet2DConditionModel` state dict in the original layout (`model.diffusion_model.`)."""
    return _remap(unet_state_dict, _unet_targets(unet_config), UNET_PREFIX, "U-Net")


def vae_to_ldm(vae_state_dict: Mapping[str, torch.Tensor], vae_config: Mapping[str, Any]) -> StateDict:
    """An `AutoencoderKL` state dict in the original layout, under `first_stage_model.`.

    The mid-block attention's q/k/v/proj_out become 1x1-conv weights [C, C, 1, 1], as in the original.
    """
    return _remap(vae_state_dict, _vae_targets(vae_config), VAE_PREFIX, "VAE")


def text_encoder_to_ldm(te_state_dict: Mapping[str, torch.Tensor], family: str = "sd1") -> StateDict:
    """A `CLIPTextModel` state dict in the original layout: SD1.x (OpenAI CLIP) or SD2.x (OpenCLIP).

    Accepts both the flattened (transformers >= 5.6) and the `text_model.`-wrapped key forms.
    """
    if family not in FAMILIES[:2]:
        raise ValueError(
            f"single-file export: family={family!r} is not one of sd1, sd2 (SDXL: sdxl_text_encoders_to_ldm)"
        )
    flat = _flat_text_encoder(te_state_dict)
    return _clip_to_ldm(flat) if family == "sd1" else _open_clip_to_ldm(flat)


def sdxl_text_encoders_to_ldm(
    te_state_dict: Mapping[str, torch.Tensor], te_2_state_dict: Mapping[str, torch.Tensor]
) -> StateDict:
    """SDXL's `CLIPTextModel` and `CLIPTextModelWithProjection` in the generative-models layout."""
    second = _flat_text_encoder(te_2_state_dict)
    projection = second.pop("text_projection.weight", None)
    if projection is None:
        raise ValueError("single-file export: SDXL's second text encoder has no text_projection")
    out = _clip_to_ldm(_flat_text_encoder(te_state_dict), SDXL_CLIP_PREFIX)
    out.update(_open_clip_to_ldm(second, SDXL_OPEN_CLIP_PREFIX))
    out[SDXL_OPEN_CLIP_PREFIX + "text_projection"] = projection.T.contiguous()
    return out


def _flat_text_encoder(te_state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """The text encoder's tensors without the `text_model.` level (plain weights only)."""
    _check_plain(te_state_dict, "text encoder")
    flat = {key.removeprefix("text_model."): tensor for key, tensor in te_state_dict.items()}
    if len(flat) != len(te_state_dict):
        raise ValueError("single-file export: text encoder has keys both with and without `text_model.`")
    return flat


def _clip_to_ldm(state_dict: Mapping[str, torch.Tensor], prefix: str = CLIP_PREFIX) -> StateDict:
    """OpenAI CLIP: HF names under `prefix` (SD1.x: `cond_stage_model.transformer.text_model.`)."""
    unknown = [key for key in state_dict if not key.startswith(_CLIP_ROOTS)]
    if unknown:
        raise ValueError(f"single-file export: text encoder tensor(s) {unknown[:5]} are not CLIP weights")
    return {prefix + key: tensor for key, tensor in state_dict.items()}


def _open_clip_to_ldm(state_dict: Mapping[str, torch.Tensor], prefix: str = OPEN_CLIP_PREFIX) -> StateDict:
    """OpenCLIP names under `prefix` (SD2.x: `cond_stage_model.model.`), q/k/v fused into `in_proj_*`."""
    out: StateDict = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unmapped = []
    for key, tensor in state_dict.items():
        match = _CLIP_LAYER_KEY.match(key)
        if key in _OPEN_CLIP_TOP:
            _put(out, prefix + _OPEN_CLIP_TOP[key], tensor, key)
        elif match is None:
            unmapped.append(key)
        elif match[2] in _QKV:
            qkv.setdefault((match[1], match[3]), {})[match[2]] = tensor
        elif match[2] in _OPEN_CLIP_LAYER:
            ldm_key = f"transformer.resblocks.{match[1]}.{_OPEN_CLIP_LAYER[match[2]]}.{match[3]}"
            _put(out, prefix + ldm_key, tensor, key)
        else:
            unmapped.append(key)
    for (layer, param), parts in qkv.items():
        if set(parts) != set(_QKV):
            unmapped.extend(f"encoder.layers.{layer}.{name}.{param}" for name in parts)
            continue
        fused = torch.cat([parts[name] for name in _QKV], dim=0)
        _put(out, f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{param}", fused, "q/k/v")
    if unmapped:
        raise ValueError(f"single-file export: text encoder tensor(s) {unmapped[:5]} have no OpenCLIP name")
    return out


def infer_family(text_encoder: Any) -> str:
    """The family of a text encoder: "sd2" for OpenCLIP (GELU, as SD2.x's ViT-H), else "sd1" (quick-GELU)."""
    return "sd2" if getattr(text_encoder.config, "hidden_act", "quick_gelu") == "gelu" else "sd1"


def _prepare(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """A CPU, contiguous tensor for the file; floating tensors cast to `dtype` when given."""
    target = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
    return tensor.detach().to(device="cpu", dtype=target).contiguous()


def save_single_file(
    path: Path,
    unet: Any,
    vae: Any,
    text_encoder: Any,
    *,
    dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
    family: str | None = None,
    text_encoder_2: Any = None,
) -> Path:
    """Write `unet`, `vae` and `text_encoder` as one original-layout `.safetensors` checkpoint, atomically.

    `family` ("sd1"/"sd2"/"sdxl") picks the text-encoder layout; by default it is inferred from the text
    encoder(s) (SDXL when `text_encoder_2` is given). `dtype` casts floating tensors (e.g. torch.float16 for
    a half-size file). Returns `path`.
    """
    family = family or ("sdxl" if text_encoder_2 is not None else infer_family(text_encoder))
    if family == "sdxl":
        if text_encoder_2 is None:
            raise ValueError("single-file export: SDXL needs text_encoder_2")
        text = sdxl_text_encoders_to_ldm(text_encoder.state_dict(), text_encoder_2.state_dict())
    else:
        text = text_encoder_to_ldm(text_encoder.state_dict(), family)
    tensors = {
        **unet_to_ldm(unet.state_dict(), unet.config),
        **vae_to_ldm(vae.state_dict(), vae.config),
        **text,
    }
    tensors = {key: _prepare(tensor, dtype) for key, tensor in tensors.items()}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", **(metadata or {})})
    return path
