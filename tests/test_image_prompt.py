"""Image-prompt conditioning: a CLIP image embedding through cross-attention (conditioning=image_prompt)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from sdtune.conditioning.image import ImagePromptConditioner
from sdtune.config import ConfigError, validate
from sdtune.models.image_encoder import TINY_CONFIG, load_image_encoder
from sdtune.sample import sample
from sdtune.train import train

from .conftest import compose_config
from .test_conditioning_runs import FAST as RUN_FAST

# the conditioning tests' quick run, as a LoRA with image prompts and one more step
FAST = ["+experiment=lora", "conditioning=image_prompt", *RUN_FAST, "trainer.max_steps=2"]


def shape_pixels(*colours: tuple[int, int, int], size: int = 64) -> torch.Tensor:
    """(N, 3, size, size) pixels in [-1, 1]: a coloured square on black per colour."""
    images = np.zeros((len(colours), size, size, 3), np.float32)
    for i, colour in enumerate(colours):
        images[i, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = np.array(colour) / 255
    return torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1


def test_the_tiny_encoder_is_the_same_everywhere_frozen_and_leaves_the_rng_alone() -> None:
    torch.manual_seed(7)
    expected_next = torch.rand(3)
    torch.manual_seed(7)
    first, second = load_image_encoder(None), load_image_encoder(None)
    assert torch.equal(torch.rand(3), expected_next), "building the encoder moved the global RNG"
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    assert not any(p.requires_grad for p in first.parameters()) and not first.training


def test_tokens_follow_the_image_and_a_dropped_image_gives_zeros(stack) -> None:
    conditioner = ImagePromptConditioner(stack, tokens=3)
    pixels = shape_pixels((255, 0, 0), (0, 0, 255), size=32)  # resized to the encoder's 64 px
    tokens = conditioner({"source_pixel_values": pixels}, torch.tensor([False, False]))
    assert tokens.shape == (2, 3, stack.unet.config.cross_attention_dim)
    assert (tokens[0] - tokens[1]).abs().max() > 1e-3, "two different images give the same tokens"
    dropped = conditioner({"source_pixel_values": pixels}, torch.tensor([False, True]))
    torch.testing.assert_close(dropped[0], tokens[0])
    assert torch.count_nonzero(dropped[1]) == 0


def test_a_local_encoder_folder_loads_as_saved(tmp_path: Path) -> None:
    from transformers import CLIPConfig, CLIPModel

    tiny = load_image_encoder(None)
    tiny.save_pretrained(tmp_path / "vision")
    pixels = torch.randn(1, 3, 64, 64)
    loaded = load_image_encoder(str(tmp_path / "vision"))
    torch.testing.assert_close(
        loaded(pixel_values=pixels).image_embeds, tiny(pixel_values=pixels).image_embeds
    )
    # A full CLIP model's folder works too (its vision half is read), as IP-Adapter setups often keep it.
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    full = CLIPModel(CLIPConfig(text_config=text, vision_config=TINY_CONFIG, projection_dim=64)).eval()
    full.save_pretrained(tmp_path / "clip")
    expected = full.visual_projection(full.vision_model(pixel_values=pixels).pooler_output)
    torch.testing.assert_close(
        load_image_encoder(str(tmp_path / "clip"))(pixel_values=pixels).image_embeds, expected
    )


def test_bad_settings_are_named_before_any_model_loads(train_cfg, tmp_path: Path) -> None:
    cfg = train_cfg(
        *FAST,
        f"conditioning.image_prompt.encoder={tmp_path / 'no-such-encoder'}",
        "conditioning.image_prompt.tokens=0",
        "conditioning.image_prompt.train_encoder=yes",
        "evaluation.every_n_steps=10",
    )
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    message = str(info.value)
    assert "conditioning.image_prompt.encoder: " in message and "no-such-encoder" in message
    assert "conditioning.image_prompt.tokens: must be an integer >= 1, got 0" in message
    assert "conditioning.image_prompt.train_encoder: must be true or false, got 'yes'" in message
    assert (
        "evaluation.every_n_steps: the evaluation generates from text prompts, but conditioning.image_prompt"
        in message
    )
    cfg = train_cfg(
        *FAST, "data=shapes", "data.cache_latents=true", "conditioning.image_prompt.key=pixel_values"
    )
    with pytest.raises(ConfigError, match="conditioning.image_prompt.key: .*data.cache_latents=false"):
        validate(cfg)


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache_dir):
    run_dir = tmp_path_factory.mktemp("image-prompt") / "run"
    return train(compose_config("train", FAST, run_dir))


def test_the_projection_trains_and_is_saved_without_the_encoder(run) -> None:
    from safetensors.torch import load_file

    component = run.module.conditioning.components["image_prompt"]
    optimizer = run.trainer.optimizers[0]
    assert int(optimizer.state[component.proj.weight]["step"]) == 2, "the projection is not optimised"
    assert not any(p in optimizer.state for p in component.encoder.parameters()), "the encoder trains"
    manifest = json.loads((run.run_dir / "manifest.json").read_text())
    assert {"format": "conditioning", "path": "conditioning.safetensors"} in manifest["exports"]
    saved = load_file(str(run.run_dir / "conditioning.safetensors"))
    assert set(saved) == {
        f"components.image_prompt.{n}" for n in ("proj.weight", "proj.bias", "norm.weight", "norm.bias")
    }
    torch.testing.assert_close(saved["components.image_prompt.proj.weight"], component.proj.weight)


def test_sampling_takes_the_image_prompt_and_follows_it(run, tmp_path: Path) -> None:
    prompts = {}
    for name, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
        pixels = ((shape_pixels(colour)[0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
        Image.fromarray(pixels).save(tmp_path / f"{name}.png")
        prompts[name] = tmp_path / f"{name}.png"
    images = {}
    for name, path in prompts.items():
        args = [f"source={run.run_dir}", "prompt=make it green", "steps=2", f"out={tmp_path / name}_out.png"]
        (out,) = sample(compose_config("sample", [*args, f"image_prompt={path}"]))
        images[name] = np.asarray(Image.open(out), dtype=np.int16)
    assert images["red"].shape == (64, 64, 3)
    assert np.abs(images["red"] - images["blue"]).max() > 0, "the image prompt does not reach the U-Net"
    args = [f"source={run.run_dir}", "prompt=make it green", f"out={tmp_path / 'x.png'}"]
    with pytest.raises(ConfigError, match="image_prompt: this model is conditioned on an image_prompt"):
        sample(compose_config("sample", args))
    cfg = OmegaConf.merge(compose_config("sample", args), {"image_prompt": str(tmp_path / "missing.png")})
    with pytest.raises(ConfigError, match="missing.png' does not exist"):
        sample(cfg)


def test_image_variations_embed_the_training_images_of_a_caption_dataset(train_cfg) -> None:
    """`key: pixel_values` on data=shapes: each image is its own prompt, and the validation samples are
    conditioned on the first training images (centre-cropped), shown beside them."""
    run = train(
        train_cfg(
            *[a for a in FAST if not a.startswith("sampling.from_data")],
            "data=shapes",
            "conditioning.image_prompt.key=pixel_values",
            "sampling.every_n_steps=2",
        )
    )
    grid = Image.open(run.run_dir / "samples" / "step_000002.png")
    assert grid.size == (2 * 64, 2 * 64)  # 2 data samples (the default), each [image prompt | sample]
    batch = run.trainer.datamodule.condition_batch(2)
    assert batch["pixel_values"].shape == (2, 3, 64, 64) and len(batch["caption"]) == 2


def test_a_trained_encoder_is_optimised_saved_and_sampled_with(train_cfg, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from sdtune.sample import load_source

    run = train(train_cfg(*FAST, "conditioning.image_prompt.train_encoder=true"))
    encoder = run.module.conditioning.components["image_prompt"].encoder
    optimizer = run.trainer.optimizers[0]
    assert all(int(optimizer.state[p]["step"]) == 2 for p in encoder.parameters())
    saved = load_file(str(run.run_dir / "conditioning.safetensors"))
    name = "components.image_prompt.encoder.visual_projection.weight"
    torch.testing.assert_close(saved[name], encoder.visual_projection.weight)
    assert not torch.equal(saved[name], load_image_encoder(None).visual_projection.weight), "did not train"
    _, conditioning, _ = load_source(
        compose_config("sample", [f"source={run.run_dir}", "prompt=a", "out=x.png", "image_prompt=x.png"])
    )
    loaded = conditioning.components["image_prompt"].encoder.visual_projection.weight
    torch.testing.assert_close(loaded, encoder.visual_projection.weight)


def test_evaluate_names_the_condition_it_cannot_supply_before_loading(run, tmp_path, monkeypatch) -> None:
    import sdtune.sample
    from sdtune.evaluate import run as evaluate

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the request was checked")

    monkeypatch.setattr(sdtune.sample, "load_source", no_loading)
    cfg = compose_config("evaluate", [f"source={run.run_dir}", f"out={tmp_path}", "judge_renders=0"])
    with pytest.raises(ConfigError, match="conditioned on image_prompt files .*sdtune.sample image_prompt="):
        evaluate(cfg)
