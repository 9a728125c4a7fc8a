"""sdtune.formats.single_file: the original-layout checkpoint loads back through diffusers' own reader."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from peft import LoraConfig, inject_adapter_in_model
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel

from sdtune.formats import single_file
from sdtune.formats.single_file import (
    save_single_file,
    text_encoder_to_ldm,
    unet_to_ldm,
    vae_to_ldm,
)
from sdtune.models.tiny import TEXT_CONFIG, UNET_CONFIG, build_tiny_pipeline

from .test_formats_kohya import loader_messages

LOADER_FAILURES = ("missing", "unexpected", "not used", "not initialized", "newly initialized")
SD1_PREFIXES = {"model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model."}
SD2_PREFIXES = {"model.diffusion_model.", "first_stage_model.", "cond_stage_model.model."}
ATOL = 1e-5

_generator = torch.Generator().manual_seed(7)
LATENTS = torch.randn(1, 4, 8, 8, generator=_generator)
TIMESTEPS = torch.tensor([500])
TOKEN_IDS = torch.randint(0, 800, (1, 16), generator=_generator)  # the tiny vocabulary has 805 tokens

Outputs = dict[str, torch.Tensor]


def perturb(pipe: StableDiffusionPipeline, seed: int = 5) -> StableDiffusionPipeline:
    """Shift every weight, so a component the loader silently took from the config folder would differ."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in (pipe.unet, pipe.vae, pipe.text_encoder):
            for param in model.parameters():
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return pipe


@torch.no_grad()
def outputs(pipe: StableDiffusionPipeline) -> Outputs:
    """U-Net noise prediction, VAE decode and text-encoder hidden states on fixed inputs."""
    hidden = pipe.text_encoder(TOKEN_IDS).last_hidden_state
    return {
        "text_encoder": hidden,
        "unet": pipe.unet(LATENTS, TIMESTEPS, encoder_hidden_states=hidden).sample,
        "vae": pipe.vae.decode(LATENTS[:, :, :4, :4]).sample,
    }


def load(path: Path, config_dir: Path) -> StableDiffusionPipeline:
    """Read `path` with diffusers' single-file loader, failing on any missing/unexpected-weights message."""
    with loader_messages() as messages:
        pipe = StableDiffusionPipeline.from_single_file(
            str(path), config=str(config_dir), local_files_only=True
        )
    failures = [m for m in messages if any(word in m.lower() for word in LOADER_FAILURES)]
    assert not failures, failures
    return pipe


def assert_outputs_equal(got: Outputs, want: Outputs) -> None:
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=ATOL, rtol=0, msg=f"{name} differs")


def variant_pipeline(
    tmp_path: Path, unet: dict[str, Any] | None = None, text: dict[str, Any] | None = None
) -> tuple[StableDiffusionPipeline, Path]:
    """The tiny stack with U-Net / text-encoder config overrides, saved as the loader's config folder."""
    base = build_tiny_pipeline()
    tokenizer = base.tokenizer
    special = {name: getattr(tokenizer, name) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    text_config = CLIPTextConfig(vocab_size=len(tokenizer), **{**TEXT_CONFIG, **(text or {})}, **special)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        components = {
            **base.components,
            "unet": UNet2DConditionModel(**{**UNET_CONFIG, **(unet or {})}),
            "text_encoder": CLIPTextModel(text_config),
        }
    pipe = StableDiffusionPipeline(**components)
    config_dir = tmp_path / "config"
    pipe.save_pretrained(config_dir, safe_serialization=True)
    return perturb(pipe), config_dir


def test_round_trip_through_diffusers_single_file_loader(tmp_path: Path, tiny_dir: Path) -> None:
    pipe = build_tiny_pipeline()
    folder_outputs = outputs(pipe)
    want = outputs(perturb(pipe))

    path = save_single_file(tmp_path / "model.safetensors", pipe.unet, pipe.vae, pipe.text_encoder)
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert len(keys) == sum(len(m.state_dict()) for m in (pipe.unet, pipe.vae, pipe.text_encoder))
    got = outputs(load(path, tiny_dir))

    assert_outputs_equal(got, want)
    # The config folder holds the unperturbed weights: matching `want` proves they came from the file.
    for name in want:
        assert not torch.allclose(folder_outputs[name], want[name], atol=1e-3), name


def tagged(state_dict: dict[str, torch.Tensor], start: int) -> dict[str, torch.Tensor]:
    """Each tensor filled with its own id (start, start+1, ...) so where it lands can be traced."""
    return {key: torch.full(t.shape, float(start + i)) for i, (key, t) in enumerate(state_dict.items())}


def element_counts(state_dict: dict[str, torch.Tensor]) -> dict[float, int]:
    """How many elements carry each id."""
    values, counts = torch.cat([t.flatten() for t in state_dict.values()]).unique(return_counts=True)
    return dict(zip(values.tolist(), counts.tolist(), strict=True))


@pytest.mark.parametrize(("family", "prefixes"), [("sd1", SD1_PREFIXES), ("sd2", SD2_PREFIXES)])
def test_every_tensor_is_written_exactly_once(family: str, prefixes: set[str]) -> None:
    pipe = build_tiny_pipeline()
    text_encoder = pipe.text_encoder
    if family == "sd2":
        text_encoder = CLIPTextModel(
            CLIPTextConfig(vocab_size=len(pipe.tokenizer), **TEXT_CONFIG, hidden_act="gelu")
        )
    unet = tagged(pipe.unet.state_dict(), 0)
    vae = tagged(pipe.vae.state_dict(), len(unet))
    te = tagged(text_encoder.state_dict(), len(unet) + len(vae))

    out = {
        **unet_to_ldm(unet, pipe.unet.config),
        **vae_to_ldm(vae, pipe.vae.config),
        **text_encoder_to_ldm(te, family),
    }

    # Same element count per source id: nothing dropped, nothing written twice (q/k/v fusion included).
    assert element_counts(out) == element_counts({**unet, **vae, **te})
    assert {p for p in prefixes for key in out if key.startswith(p)} == prefixes
    assert all(sum(key.startswith(p) for p in prefixes) == 1 for key in out)
    if family == "sd1":
        assert len(out) == len(unet) + len(vae) + len(te)
    vae_attention = [k for k in out if ".mid.attn_1." in k and k.endswith("weight") and ".norm." not in k]
    assert len(vae_attention) == 8 and all(
        out[k].ndim == 4 and out[k].shape[2:] == (1, 1) for k in vae_attention
    )


@pytest.mark.parametrize(
    "unet",
    [
        {"block_out_channels": [32, 64, 64, 64]},
        {"block_out_channels": [32, 64, 64, 64], "layers_per_block": 1},
    ],
    ids=["widths", "widths-one-layer"],
)
def test_other_unet_shapes_round_trip(tmp_path: Path, unet: dict[str, Any]) -> None:
    pipe, config_dir = variant_pipeline(tmp_path, unet=unet)
    want = outputs(pipe)
    path = save_single_file(tmp_path / "model.safetensors", pipe.unet, pipe.vae, pipe.text_encoder)
    assert_outputs_equal(outputs(load(path, config_dir)), want)


def test_sd2_layout_round_trips(tmp_path: Path) -> None:
    sd2_unet = {"use_linear_projection": True, "attention_head_dim": [2, 4, 8, 8]}
    pipe, config_dir = variant_pipeline(tmp_path, unet=sd2_unet, text={"hidden_act": "gelu"})
    want = outputs(pipe)

    path = save_single_file(tmp_path / "model.safetensors", pipe.unet, pipe.vae, pipe.text_encoder)
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert {p for p in SD2_PREFIXES for key in keys if key.startswith(p)} == SD2_PREFIXES
    assert "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight" in keys
    assert_outputs_equal(outputs(load(path, config_dir)), want)


def test_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = build_tiny_pipeline()
    path = save_single_file(tmp_path / "model.safetensors", pipe.unet, pipe.vae, pipe.text_encoder)
    before = path.read_bytes()

    def fail_midway(tensors: dict[str, torch.Tensor], filename: str, metadata: dict[str, str]) -> None:
        Path(filename).write_bytes(before[: len(before) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(single_file, "save_file", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        save_single_file(path, pipe.unet, pipe.vae, pipe.text_encoder, dtype=torch.float16)

    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_dtype_and_metadata(tmp_path: Path) -> None:
    pipe = build_tiny_pipeline()
    path = save_single_file(
        tmp_path / "half.safetensors",
        pipe.unet,
        pipe.vae,
        pipe.text_encoder,
        dtype=torch.float16,
        metadata={"sdtune.run": "abc"},
    )
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt", "sdtune.run": "abc"}
        assert {f.get_slice(key).get_dtype() for key in f.keys()} == {"F16"}


REAL_UNETS = {
    "sd15": {"cross_attention_dim": 768, "attention_head_dim": 8},
    "sd2": {
        "cross_attention_dim": 1024,
        "attention_head_dim": [5, 10, 20, 20],
        "use_linear_projection": True,
    },
}
SD15_KEYS = [  # names every SD1.x checkpoint has; the upsamplers sit after attention only where there is one
    "model.diffusion_model.input_blocks.3.0.op.weight",
    "model.diffusion_model.input_blocks.9.0.op.weight",
    "model.diffusion_model.input_blocks.11.0.emb_layers.1.weight",
    "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
    "model.diffusion_model.output_blocks.2.1.conv.weight",
    "model.diffusion_model.output_blocks.5.2.conv.weight",
    "model.diffusion_model.output_blocks.8.2.conv.weight",
    "model.diffusion_model.output_blocks.11.0.skip_connection.weight",
    "model.diffusion_model.out.2.weight",
]


@pytest.mark.parametrize("name", sorted(REAL_UNETS))
def test_real_size_unet_names_read_back_by_diffusers(name: str) -> None:
    with torch.device("meta"):
        unet = UNet2DConditionModel(block_out_channels=[320, 640, 1280, 1280], **REAL_UNETS[name])
    state_dict = unet.state_dict()
    ldm = unet_to_ldm(state_dict, unet.config)

    assert len(ldm) == len(state_dict) == 686
    assert set(SD15_KEYS) <= set(ldm)
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in state_dict.items()}


def test_real_size_vae_and_text_encoders_read_back_by_diffusers() -> None:
    with torch.device("meta"):
        vae = AutoencoderKL(
            block_out_channels=[128, 256, 512, 512],
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            layers_per_block=2,
        )
        clip_l = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12))
        open_clip_h = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=1024,
                intermediate_size=4096,
                num_hidden_layers=23,
                num_attention_heads=16,
                hidden_act="gelu",
            )
        )
    ldm_vae = vae_to_ldm(vae.state_dict(), vae.config)
    assert "first_stage_model.decoder.up.3.upsample.conv.weight" in ldm_vae
    assert ldm_vae["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    cases = [
        (vae, convert_ldm_vae_checkpoint(ldm_vae, dict(vae.config))),
        (clip_l, convert_ldm_clip_checkpoint(text_encoder_to_ldm(clip_l.state_dict(), "sd1"))),
        (
            open_clip_h,
            convert_open_clip_checkpoint(open_clip_h, text_encoder_to_ldm(open_clip_h.state_dict(), "sd2")),
        ),
    ]
    for model, back in cases:
        back = {key.removeprefix("text_model."): value for key, value in back.items()}
        assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_refuses_what_it_cannot_write() -> None:
    pipe = build_tiny_pipeline()
    with pytest.raises(ValueError, match="SDXL's text_time"):
        unet_to_ldm(pipe.unet.state_dict(), {**pipe.unet.config, "addition_embed_type": "text"})
    with pytest.raises(ValueError, match="no original-layout name"):
        unet_to_ldm(
            {**pipe.unet.state_dict(), "add_embedding.linear_1.weight": torch.zeros(1)}, pipe.unet.config
        )
    with pytest.raises(ValueError, match="not CLIP weights"):
        text_encoder_to_ldm({"text_projection.weight": torch.zeros(1)}, "sd1")
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["to_q"]), pipe.unet)
    with pytest.raises(ValueError, match="merge them first"):
        unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config)
