"""peft LoRA weights to and from the kohya format that A1111, ComfyUI and kohya sd-scripts read.

A kohya file holds, per adapted module, `<prefix>_<module path with "." -> "_">.lora_down.weight` (peft's
`lora_A`), `.lora_up.weight` (`lora_B`) and a 0-dim `.alpha`; every reader applies
`W + (alpha / r) * up @ down` with `r = lora_down.shape[0]`. Prefixes are `lora_unet` and `lora_te`, and text
encoder paths are written in their canonical `text_model.` form even when the installed transformers has
flattened `CLIPTextModel`. SDXL files name the U-Net as sd-scripts' sgm U-Net does
(`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`; the block numbers come from the U-Net config)
and the text encoders `lora_te1_` / `lora_te2_`.

Export writes ONE alpha value for the whole file: diffusers loses per-module alphas, so a module whose
trained scale differs from `alpha / r` gets the difference folded into its `lora_up`. A text-encoder attention
adapted on only some of q/k/v/out gets all-zero LoRA on the others, because diffusers and A1111 need all four.

Import pads every module to the largest rank in the file (zero rows in `lora_A`, zero columns in `lora_B`,
which change nothing and stay zero under training) and folds per-module scales into `lora_B`, so a single
`LoraConfig(r=rank, lora_alpha=alpha, target_modules=peft_target_modules(sd))` reproduces the file exactly.

The file around the tensors (header metadata, hashes, atomic save) is `sdtune.formats.kohya_file`.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from peft import LoraConfig
from peft.utils.other import get_pattern_key

from sdtune.formats.kohya_file import SDXL_TE_PREFIXES, TE_PREFIX, UNET_PREFIX, key_listing
from sdtune.formats.single_file import UNET_RESNET_SGM

TE_PREFIX_ALIASES = ("lora_te_", "lora_te1_")  # diffusers' own kohya writer uses lora_te1_ for SD1
DOWN, UP, ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"
PEFT_A, PEFT_B = ".lora_A.weight", ".lora_B.weight"
PEFT_WRAPPER_PREFIX = "base_model.model."
_CLIP_ATTENTION = re.compile(r"^(lora_te[12]?_.*_self_attn_)(q|k|v|out)_proj$")
_SGM_NAME = re.compile(r"lora_unet_(input_blocks|middle_block|output_blocks)_|lora_te2_")


def _check_family(family: str) -> None:
    """Raise ValueError unless `family` is one this module knows (sd1, sd2, sdxl)."""
    if family not in ("sd1", "sd2", "sdxl"):
        raise ValueError(f"family={family!r} is not one of sd1, sd2, sdxl")


# ---------------------------------------------------------------------------------------------------------
# peft -> kohya
# ---------------------------------------------------------------------------------------------------------


def peft_to_kohya(
    unet_lora: dict[str, torch.Tensor],
    unet_config: LoraConfig,
    text_encoder_lora: dict[str, torch.Tensor] | None = None,
    text_encoder_config: LoraConfig | None = None,
    *,
    family: str = "sd1",
    dtype: torch.dtype | None = None,
    text_encoder_2_lora: dict[str, torch.Tensor] | None = None,
    text_encoder_2_config: LoraConfig | None = None,
    unet_layout: Any = None,
) -> dict[str, torch.Tensor]:
    """Convert `get_peft_model_state_dict` outputs of the U-Net (and text encoders) to a kohya state dict.

    All modules share one `.alpha` (the most common trained alpha); `dtype` casts the weights (default: as
    trained); alphas are float32. SDXL (`family="sdxl"`) needs `unet_layout` (the U-Net's config) to name
    U-Net modules the sgm way; its text encoders are `lora_te1_` and `text_encoder_2_lora` → `lora_te2_`.
    """
    _check_family(family)
    if family == "sdxl" and unet_layout is None:
        raise ValueError("family='sdxl' needs unet_layout (the U-Net config) for sgm block names")
    rename = (lambda path: sgm_unet_path(path, unet_layout)) if family == "sdxl" else None
    modules = _peft_modules(unet_lora, unet_config, UNET_PREFIX, canonical_te=False, rename=rename)
    te_prefixes = SDXL_TE_PREFIXES if family == "sdxl" else (TE_PREFIX,)
    encoders = [(text_encoder_lora, text_encoder_config), (text_encoder_2_lora, text_encoder_2_config)]
    for prefix, (lora, config) in zip(te_prefixes, encoders):
        if lora and config is None:
            raise ValueError(f"{prefix} LoRA weights were given without their LoraConfig")
        if lora:
            te_modules = _peft_modules(lora, config, prefix, canonical_te=True)
            modules += te_modules + _missing_attention_projections(te_modules)
    if not modules:
        raise ValueError("no LoRA weights to export: the peft state dicts are empty")
    trained_alphas = [m.kohya_alpha for m in modules if m.kohya_alpha is not None]
    file_alpha = Counter(trained_alphas).most_common(1)[0][0]
    out: dict[str, torch.Tensor] = {}
    for m in modules:
        out_dtype = dtype or m.down.dtype
        factor = 1.0 if m.kohya_alpha is None else m.kohya_alpha / file_alpha
        out[m.name + DOWN] = m.down.to(out_dtype).contiguous().clone()
        out[m.name + UP] = _scaled(m.up, factor, out_dtype)
        out[m.name + ALPHA] = torch.tensor(file_alpha, dtype=torch.float32)
    return out


@dataclass
class _PeftModule:
    """One adapted module: its kohya name, weights and the alpha giving peft's scale at its rank.

    `kohya_alpha` is None for an all-zero filler module, whose scale does not matter.
    """

    name: str
    down: torch.Tensor
    up: torch.Tensor
    kohya_alpha: float | None


def _missing_attention_projections(modules: list[_PeftModule]) -> list[_PeftModule]:
    """All-zero LoRA for the q/k/v/out projections missing from a partly adapted CLIP attention.

    diffusers cannot convert a text-encoder attention LoRA without `out_proj`, and A1111 applies SD2 text
    encoder attention LoRA only when q, k, v and out are all present. CLIP's four projections share one shape.
    """
    present: dict[str, dict[str, _PeftModule]] = {}
    for module in modules:
        match = _CLIP_ATTENTION.match(module.name)
        if match:
            present.setdefault(match.group(1), {})[match.group(2)] = module
    fillers = []
    for attention, projections in present.items():
        sibling = next(iter(projections.values()))
        for projection in ("q", "k", "v", "out"):
            if projection not in projections:
                down, up = torch.zeros_like(sibling.down), torch.zeros_like(sibling.up)
                fillers.append(_PeftModule(f"{attention}{projection}_proj", down, up, None))
    return fillers


def _peft_modules(
    state_dict: dict[str, torch.Tensor],
    config: LoraConfig,
    prefix: str,
    *,
    canonical_te: bool,
    rename: Callable[[str], str] | None = None,
) -> list[_PeftModule]:
    """Group a peft state dict by module, check it against `config`, and resolve each module's alpha."""
    _check_config(config)
    pairs = _group_peft_keys(state_dict)
    modules = []
    for path, (a, b) in pairs.items():
        r = a.shape[0]
        if b.shape[1] != r:
            raise ValueError(f"{path}: lora_A has rank {r} but lora_B has {b.shape[1]} columns")
        config_r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), path), config.r)
        if config_r != r:
            raise ValueError(
                f"{path}: the weights have rank {r} but the LoraConfig gives rank {config_r}; "
                "pass the config the adapter was trained with"
            )
        alpha = config.alpha_pattern.get(
            get_pattern_key(config.alpha_pattern.keys(), path), config.lora_alpha
        )
        scale = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        kohya_path = path if not canonical_te or path.startswith("text_model.") else "text_model." + path
        kohya_path = rename(kohya_path) if rename is not None else kohya_path
        modules.append(_PeftModule(prefix + kohya_path.replace(".", "_"), a, b, scale * r))
    return modules


_TOP_LEVEL_SGM = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def sgm_unet_path(path: str, layout: Any) -> str:
    """The sgm (Stability's generative-models) path of a diffusers U-Net module, as sd-scripts names SDXL.

    `layout` is the U-Net config: `layers_per_block` gives the flat `input_blocks` / `output_blocks`
    numbering (`down_blocks.1.attentions.0` → `input_blocks.4.1` when it is 2), `up_block_types` whether
    an up level's upsampler follows an attention (index 2) or only a resnet (index 1).
    """
    for name, sgm in _TOP_LEVEL_SGM.items():
        if path == name or path.startswith(name + "."):
            return sgm + path.removeprefix(name)
    per_level = int(layout.layers_per_block) + 1
    parts = path.split(".")
    if parts[0] not in ("down_blocks", "mid_block", "up_blocks") or len(parts) < 4:
        raise ValueError(f"U-Net module {path!r} has no sgm name; adapt modules inside the blocks only")
    if parts[0] == "mid_block":
        kind, index, rest = parts[1], int(parts[2]), parts[3:]
        block = 1 if kind == "attentions" else 2 * index
        return _sgm_join(f"middle_block.{block}", kind, rest)
    level, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
    if parts[0] == "down_blocks":
        if kind == "downsamplers":
            return f"input_blocks.{(level + 1) * per_level}.0." + ".".join(["op", *rest[1:]])
        block = 1 + level * per_level + index
        return _sgm_join(f"input_blocks.{block}.{0 if kind == 'resnets' else 1}", kind, rest)
    if kind == "upsamplers":
        after = 2 if "CrossAttn" in layout.up_block_types[level] else 1
        return f"output_blocks.{level * per_level + per_level - 1}.{after}." + ".".join(rest)
    block = level * per_level + index
    return _sgm_join(f"output_blocks.{block}.{0 if kind == 'resnets' else 1}", kind, rest)


def _sgm_join(block: str, kind: str, rest: list[str]) -> str:
    if kind == "resnets":
        rest = [UNET_RESNET_SGM.get(rest[0], rest[0]), *rest[1:]]
    return ".".join([block, *rest])


def _check_config(config: LoraConfig) -> None:
    """Reject LoRA variants that the kohya `networks.lora` format cannot represent."""
    if getattr(config, "use_dora", False):
        raise ValueError(
            "DoRA adapters cannot be written in kohya format (readers drop dora_scale); use format=peft"
        )
    if getattr(config, "lora_bias", False):
        raise ValueError("LoRA with lora_bias=True cannot be written in kohya format; use format=peft")


def _group_peft_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Map module path -> (lora_A, lora_B); raise on any other key."""
    halves: dict[str, dict[str, torch.Tensor]] = {}
    unsupported = []
    for key, tensor in state_dict.items():
        key = key.removeprefix(PEFT_WRAPPER_PREFIX)
        if key.startswith(("unet.", "text_encoder.")):
            raise ValueError(
                f"{key}: strip the pipeline prefix; pass get_peft_model_state_dict(model) output"
            )
        for suffix in (PEFT_A, PEFT_B):
            if key.endswith(suffix):
                halves.setdefault(key.removesuffix(suffix), {})[suffix] = tensor
                break
        else:
            unsupported.append(key)
    if unsupported:
        raise ValueError(
            "these peft keys have no kohya equivalent (only plain LoRA on Linear/Conv2d is supported): "
            + key_listing(unsupported)
        )
    incomplete = [path for path, h in halves.items() if len(h) != 2]
    if incomplete:
        raise ValueError("these modules lack lora_A or lora_B: " + key_listing(incomplete))
    return {path: (h[PEFT_A], h[PEFT_B]) for path, h in halves.items()}


def _scaled(tensor: torch.Tensor, factor: float, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous copy of `tensor` times `factor` in `dtype`, multiplied in float64 when needed."""
    if factor == 1.0:
        return tensor.to(dtype).contiguous().clone()
    return (tensor.to(torch.float64) * factor).to(dtype).contiguous()


# ---------------------------------------------------------------------------------------------------------
# kohya -> peft
# ---------------------------------------------------------------------------------------------------------


def kohya_to_peft(
    state_dict: dict[str, torch.Tensor],
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module | None = None,
    *,
    family: str = "sd1",
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, int, float]:
    """Convert a kohya state dict to peft-keyed (U-Net, text encoder) dicts plus one (rank, alpha) pair.

    Names are resolved against the real modules of `unet` / `text_encoder` and shapes checked against them.
    Modules are zero-padded to the largest rank and their scales folded into `lora_B`, so
    `LoraConfig(r=rank, lora_alpha=alpha)` on the returned modules reproduces the file. A missing or zero
    `.alpha` means alpha = rank (sd-scripts' rule). The text-encoder dict is None when the file has none.
    SDXL files with a second text encoder: `kohya_to_peft_parts`.
    """
    parts, rank, alpha = kohya_to_peft_parts(state_dict, {"unet": unet, "text_encoder": text_encoder}, family)
    return parts.get("unet", {}), parts.get("text_encoder"), rank, alpha


def kohya_to_peft_parts(
    state_dict: dict[str, torch.Tensor], models: dict[str, torch.nn.Module | None], family: str = "sd1"
) -> tuple[dict[str, dict[str, torch.Tensor]], int, float]:
    """`kohya_to_peft` for named models (`unet`, `text_encoder`, SDXL's `text_encoder_2`): ({name: peft
    dict} for those the file adapts, rank, alpha). SDXL files name the U-Net the sgm way and the text
    encoders `lora_te1_` / `lora_te2_`."""
    _check_family(family)
    index: dict[str, tuple[str, _ModuleInfo]] = {}  # kohya name -> (model name, module info)
    for part, model in models.items():
        if model is not None:
            index.update({name: (part, info) for name, info in _part_index(part, model, family).items()})
    groups, unknown = _group_kohya_keys(state_dict, index, alias=family != "sdxl")
    if unknown:
        raise ValueError(_unknown_keys_message(unknown, models.get("text_encoder") is None, family))
    modules = {name: _check_module(name, parts, index[name][1]) for name, parts in groups.items()}
    if not modules:
        raise ValueError("the kohya state dict holds no LoRA modules")
    rank = max(down.shape[0] for down, _, _ in modules.values())
    file_scale = Counter(alpha / down.shape[0] for down, _, alpha in modules.values()).most_common(1)[0][0]
    alpha = _alpha_for(file_scale, rank, modules.values())
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, (down, up, module_alpha) in modules.items():
        part, (path, _) = index[name]
        factor = (module_alpha / down.shape[0]) / (alpha / rank)
        target = out.setdefault(part, {})
        target[path + PEFT_A] = _pad(down, rank, dim=0).contiguous().clone()
        target[path + PEFT_B] = _pad(_scaled(up, factor, up.dtype), rank, dim=1).contiguous()
    return out, rank, alpha


def _part_index(part: str, model: torch.nn.Module, family: str) -> dict[str, _ModuleInfo]:
    """kohya names of one model's modules: its prefix, and sgm U-Net names for SDXL."""
    sdxl = family == "sdxl"
    if part == "unet":
        layout = getattr(model, "config", None)
        rename = (lambda path: sgm_unet_path(path, layout)) if sdxl else None
        return _module_index(model, UNET_PREFIX, te=False, rename=rename)
    prefixes = {
        "text_encoder": SDXL_TE_PREFIXES[0] if sdxl else TE_PREFIX,
        "text_encoder_2": SDXL_TE_PREFIXES[1],
    }
    return _module_index(model, prefixes[part], te=True)


def peft_target_modules(peft_state_dict: dict[str, torch.Tensor]) -> list[str]:
    """The module paths a peft state dict adapts, for `LoraConfig(target_modules=...)`."""
    return sorted({key.removesuffix(PEFT_A).removesuffix(PEFT_B) for key in peft_state_dict})


_ModuleInfo = tuple[str, torch.Size]
_KohyaModule = tuple[torch.Tensor, torch.Tensor, float]  # (down, up, alpha)


def _module_index(
    model: torch.nn.Module, prefix: str, *, te: bool, rename: Callable[[str], str] | None = None
) -> dict[str, _ModuleInfo]:
    """kohya name -> (module path, base weight shape) for every Linear/Conv2d in `model`.

    Text-encoder modules are indexed with and without the `text_model.` level, so files written for either
    transformers layout resolve; names that two modules would share are dropped. `rename` maps a module path
    to the path the file uses (SDXL's sgm names); modules it has no name for are left out.
    """
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    index: dict[str, _ModuleInfo | None] = {}
    for path, module in model.named_modules():
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        if not isinstance(base, (torch.nn.Linear, torch.nn.Conv2d)) or path.endswith(".base_layer"):
            continue
        variants = {path}
        if te:
            variants |= {path.removeprefix("text_model."), "text_model." + path.removeprefix("text_model.")}
        if rename is not None:
            try:
                variants = {rename(path)}
            except ValueError:
                continue
        for variant in variants:
            name = prefix + variant.replace(".", "_")
            clash = name in index and (index[name] is None or index[name][0] != path)
            index[name] = None if clash else (path, base.weight.shape)
    return {name: info for name, info in index.items() if info is not None}


def _group_kohya_keys(
    state_dict: dict[str, torch.Tensor], names: dict[str, object], *, alias: bool
) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """Split keys into known module name -> {suffix: tensor}, plus the keys that match no module.

    With `alias` (SD1/SD2) `lora_te1_` reads as `lora_te_`, as diffusers' own kohya writer names SD1 files.
    """
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in state_dict.items():
        name, dot, suffix = key.partition(".")
        for other in TE_PREFIX_ALIASES[1:] if alias else ():
            if name.startswith(other):
                name = TE_PREFIX + name.removeprefix(other)
        if dot + suffix in (DOWN, UP, ALPHA) and name in names:
            groups.setdefault(name, {})[dot + suffix] = tensor
        else:
            unknown.append(key)
    return groups, unknown


def _unknown_keys_message(unknown: list[str], no_text_encoder: bool, family: str) -> str:
    """Explain keys that match no module, with the likely cause."""
    message = "these kohya keys match no module of the given model(s): " + key_listing(unknown)
    if family != "sdxl" and any(_SGM_NAME.match(key) for key in unknown):
        message += ". They look like an SDXL LoRA: use it with an SDXL base model (family sdxl)"
    elif no_text_encoder and any(key.startswith(TE_PREFIX_ALIASES) for key in unknown):
        message += ". The file has text-encoder LoRA: pass text_encoder=, or remove the lora_te_ keys"
    return message


def _check_module(name: str, parts: dict[str, torch.Tensor], info: _ModuleInfo) -> _KohyaModule:
    """Return (down, up, alpha) for one module, shaped like peft's, after checking them against the base."""
    missing = [suffix for suffix in (DOWN, UP) if suffix not in parts]
    if missing:
        raise ValueError(f"{name}: the file has no {' or '.join(name + s for s in missing)}")
    path, weight_shape = info
    down, up = parts[DOWN], parts[UP]
    rank = down.shape[0]
    want_down, want_up = (rank, *weight_shape[1:]), (weight_shape[0], rank, *([1] * (len(weight_shape) - 2)))
    is_pointwise_conv = len(weight_shape) == 4 and tuple(weight_shape[2:]) == (1, 1)
    if is_pointwise_conv and down.dim() == 2 and up.dim() == 2:
        down, up = down[:, :, None, None], up[:, :, None, None]  # 2-D LoRA on a 1x1 conv is the same map
    for key, tensor, want in ((name + DOWN, down, want_down), (name + UP, up, want_up)):
        if tuple(tensor.shape) != want:
            raise ValueError(
                f"{key}: shape {tuple(tensor.shape)} does not fit {path} (base weight {tuple(weight_shape)}, "
                f"expected {want}). Was this LoRA trained for a different base model? Use the base model "
                "(family and size) it was trained on."
            )
    alpha = float(parts[ALPHA].item()) if ALPHA in parts else 0.0
    return down, up, alpha if alpha != 0.0 else float(rank)


def _alpha_for(scale: float, rank: int, modules: Iterable[_KohyaModule]) -> float:
    """The alpha giving `scale` at `rank`, exactly a module's own alpha where one has that scale and rank."""
    for down, _, alpha in modules:
        if down.shape[0] == rank and alpha / rank == scale:
            return alpha
    return scale * rank


def _pad(tensor: torch.Tensor, rank: int, *, dim: int) -> torch.Tensor:
    """Zero-pad `tensor` along `dim` to size `rank`."""
    missing = rank - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor, tensor.new_zeros(shape)], dim=dim)
