"""Loading the stack from each kind of `model.pretrained`; the tiny stack is deterministic."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from sdtune.config import ConfigError
from sdtune.models.loading import classify_source, load_stack
from sdtune.models.tiny import build_tiny_pipeline


def model_cfg(pretrained: str | None, **extra) -> OmegaConf:
    return OmegaConf.create(
        {
            "family": "sd1",
            "pretrained": pretrained,
            "config": None,
            "revision": None,
            "variant": None,
            **extra,
        }
    )


def test_classify_source(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert classify_source(None) == "tiny"
    assert classify_source(str(tmp_path)) == "local"
    assert classify_source(str(tmp_path / "model.safetensors")) == "single_file"
    assert classify_source("stable-diffusion-v1-5/stable-diffusion-v1-5") == "hub"
    assert classify_source(str(tmp_path / "gone")) == "missing"
    assert classify_source("./relative/model.ckpt") == "missing"


def test_tiny_stack_is_deterministic_and_sd15_shaped() -> None:
    first, second = build_tiny_pipeline(), build_tiny_pipeline()
    for a, b in zip(first.unet.state_dict().values(), second.unet.state_dict().values()):
        assert torch.equal(a, b)
    config = first.unet.config
    assert list(config.down_block_types) == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert config.layers_per_block == 2
    assert len(first.vae.config.block_out_channels) == 4  # 8x downsampling, like SD
    assert first.tokenizer("a red circle").input_ids[1:-1] == [
        first.tokenizer.convert_tokens_to_ids(t) for t in ("a</w>", "red</w>", "circle</w>")
    ]


def test_local_folder_loads_the_same_weights(tiny_dir: Path, cache_dir: Path) -> None:
    stack = load_stack(model_cfg(str(tiny_dir)), cache_dir)
    embedded = load_stack(model_cfg(None), cache_dir)
    assert stack.base_model == str(tiny_dir.resolve()) == embedded.base_model
    for a, b in zip(stack.unet.parameters(), embedded.unet.parameters()):
        assert torch.equal(a, b)
    assert not any(p.requires_grad for p in stack.unet.parameters())
    assert stack.noise_scheduler.config.prediction_type == "epsilon"


def test_single_file_checkpoint_loads_the_same_weights(
    tiny_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    """`model.pretrained=<file>.safetensors` (A1111/ComfyUI layout), its component configs from a local
    folder (`model.config`), as an offline machine needs; a file that is not a checkpoint is named."""
    from sdtune.formats.single_file import save_single_file

    folder = load_stack(model_cfg(str(tiny_dir)), cache_dir)
    path = save_single_file(tmp_path / "tiny.safetensors", folder.unet, folder.vae, folder.text_encoder)
    stack = load_stack(model_cfg(str(path), config=str(tiny_dir)), cache_dir)
    for name, model in (("unet", stack.unet), ("vae", stack.vae), ("text_encoder", stack.text_encoder)):
        expected = getattr(folder, name).state_dict()
        state = model.state_dict()
        assert state.keys() == expected.keys(), name
        for key, value in state.items():
            assert torch.equal(value, expected[key]), f"{name}.{key}"
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="junk.safetensors.*model.config="):
        load_stack(model_cfg(str(tmp_path / "junk.safetensors"), config=str(tiny_dir)), cache_dir)


def test_uncached_hub_id_offline_fails_fast_with_advice(cache_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="local diffusers folder"):
        load_stack(model_cfg("sdtune-tests/not-a-real-model"), cache_dir)


def test_sdxl_family_loads_the_tiny_sdxl_stack(cache_dir: Path) -> None:
    stack = load_stack(model_cfg(None, family="sdxl"), cache_dir)
    assert type(stack.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert stack.tokenizer_2 is not None and len(stack.text_encoders) == 2
    assert stack.unet.config.addition_embed_type == "text_time"


def test_shipped_weights_load_in_either_clip_key_layout() -> None:
    """transformers 5.x releases differ on `text_model.` in CLIPTextModel's keys; both layouts load."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdtune.models.tiny import in_model_layout

    config = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    model = CLIPTextModel(config)
    own = model.state_dict()
    flat = {k.removeprefix("text_model."): v for k, v in own.items()}
    prefixed = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in own.items()}
    for state in (flat, prefixed):
        assert in_model_layout(state, model).keys() == own.keys()
    assert in_model_layout({"nope": own[next(iter(own))]}, model).keys() == {
        "nope"
    }  # left to the strict load
