"""peft LoHa / LoKr adapters in the LyCORIS key format that A1111 and ComfyUI read (SD1.x/SD2.x).

Module names follow the kohya rule (`lora_unet_<path with . -> _>`, `lora_te_text_model_…`); tensors
keep LyCORIS' names, which peft shares: `hada_w1_a`, `hada_w1_b`, `hada_w2_a`, `hada_w2_b`
(ΔW = (w1a·w1b) ⊙ (w2a·w2b)) and `lokr_w1[_a|_b]`, `lokr_w2[_a|_b]` (ΔW = w1 ⊗ w2). LyCORIS applies
`alpha / r` to LoHa and, for LoKr, ignores alpha when both factors are full matrices; so LoKr files carry
their scale folded into the w2 factor and `alpha = r`, which every reader turns into a scale of 1.
"""

from __future__ import annotations

from typing import Any

import torch

from sdtune.formats.kohya_file import TE_PREFIX, UNET_PREFIX

LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def peft_to_lycoris(
    unet_state: dict[str, torch.Tensor],
    unet_config: Any,
    text_encoder_state: dict[str, torch.Tensor] | None = None,
    text_encoder_config: Any | None = None,
) -> dict[str, torch.Tensor]:
    """LyCORIS-keyed tensors of peft LoHa/LoKr state dicts (`get_peft_model_state_dict` output)."""
    out = _convert(unet_state, unet_config, UNET_PREFIX, text_encoder=False)
    if text_encoder_state:
        out.update(_convert(text_encoder_state, text_encoder_config, TE_PREFIX, text_encoder=True))
    return out


def _convert(state: dict[str, torch.Tensor], config: Any, prefix: str, *, text_encoder: bool) -> dict:
    kind = type(config).__name__
    if kind not in ("LoHaConfig", "LoKrConfig"):
        raise ValueError(f"{kind} adapters have no LyCORIS form here; only LoHa and LoKr")
    names = LOHA_KEYS if kind == "LoHaConfig" else LOKR_KEYS
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        path, _, leaf = key.rpartition(".")
        if leaf not in names:
            raise ValueError(f"{key}: not a {kind} tensor")
        if text_encoder and not path.startswith("text_model."):
            path = "text_model." + path  # the canonical CLIP path readers expect
        modules.setdefault(prefix + path.replace(".", "_"), {})[leaf] = tensor
    scale = config.alpha / config.r
    out: dict[str, torch.Tensor] = {}
    for name, tensors in modules.items():
        if kind == "LoKrConfig":
            w2 = "lokr_w2" if "lokr_w2" in tensors else "lokr_w2_b"
            tensors = {**tensors, w2: tensors[w2] * scale}
            alpha = float(config.r)
        else:
            alpha = float(config.alpha)
        for leaf, tensor in tensors.items():
            out[f"{name}.{leaf}"] = tensor.detach().cpu().contiguous().clone()
        out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


def lycoris_delta(tensors: dict[str, torch.Tensor], name: str, shape: torch.Size) -> torch.Tensor:
    """ΔW of module `name` as a LyCORIS reader computes it (scale included), reshaped to `shape`."""
    get = tensors.get
    if f"{name}.hada_w1_a" in tensors:
        w1 = get(f"{name}.hada_w1_a") @ get(f"{name}.hada_w1_b")
        w2 = get(f"{name}.hada_w2_a") @ get(f"{name}.hada_w2_b")
        rank = get(f"{name}.hada_w1_b").shape[0]
        return (float(get(f"{name}.alpha")) / rank) * (w1 * w2).reshape(shape)
    w1 = get(f"{name}.lokr_w1")
    if w1 is None:
        w1 = get(f"{name}.lokr_w1_a") @ get(f"{name}.lokr_w1_b")
    w2 = get(f"{name}.lokr_w2")
    if w2 is None:
        w2 = get(f"{name}.lokr_w2_a") @ get(f"{name}.lokr_w2_b").flatten(1)
    return torch.kron(w1, w2.flatten(1)).reshape(shape)
