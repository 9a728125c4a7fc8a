"""Conditioned training end to end on the tiny stack: semantic maps, edit pairs, representation vectors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from sdtune.config import ConfigError
from sdtune.formats.exporters import LORA_FORMATS, ExportError, context_from_module
from sdtune.sample import sample
from sdtune.train import train

from .conftest import compose_config

FAST = [
    "trainer.max_steps=1",
    "data.num_images=4",
    "data.batch_size=2",
    "method.lr=1e-2",
    "sampling.steps=1",
    "sampling.per_prompt=1",
    "sampling.from_data=1",
    "sampling.every_n_steps=0",
    "logger=none",
]


def train_run(tmp_path_factory, name: str, *overrides: str):
    run_dir = tmp_path_factory.mktemp(name) / "run"
    run = train(compose_config("train", [*overrides, *FAST], run_dir))
    run.module.eval()
    return run


def data_root(run) -> Path:
    return Path(run.trainer.datamodule.root)


@torch.no_grad()
def unet_output(unet, extra: torch.Tensor) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)
    return unet(torch.cat([latents, extra], 1), torch.tensor([500]), encoder_hidden_states=context).sample


def sample_cfg(run, out: Path, *overrides: str):
    return compose_config(
        "sample", [f"source={run.run_dir}", "prompt=a shape", "steps=2", f"out={out}", *overrides]
    )


# ---- semantic maps -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def semantic_run(tmp_path_factory, cache_dir):
    return train_run(tmp_path_factory, "semantic", "+experiment=semantic")


def test_semantic_run_exports_a_widened_pipeline_that_reloads(semantic_run) -> None:
    run, module = semantic_run.run_dir, semantic_run.module
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["exports"] == [{"format": "merged", "path": "pipeline"}]
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert {"unet.conv_in.weight", "unet.conv_in.bias"} <= set(checkpoint)
    assert checkpoint["unet.conv_in.weight"].shape[1] == 11

    pipe = StableDiffusionPipeline.from_pretrained(run / "pipeline")
    assert pipe.unet.config.in_channels == 11  # 4 latent + 7 classes
    assert pipe.unet.conv_in.weight[:, 4:].abs().max() > 0, "the zero-initialised map channels never trained"
    one_hot = torch.zeros(1, 7, 8, 8)
    one_hot[:, 0] = 1
    other = torch.zeros(1, 7, 8, 8)
    other[:, 3] = 1
    reloaded = unet_output(pipe.unet, one_hot)
    torch.testing.assert_close(reloaded, unet_output(module.unet, one_hot), atol=1e-4, rtol=1e-4)
    assert (reloaded - unet_output(pipe.unet, other)).abs().max() > 1e-4, "the map does not reach the U-Net"

    grid = Image.open(run / "samples" / "step_000001.png")
    assert grid.size == (128, 64), "the colourised map stands beside the sample"


def test_lora_only_formats_refuse_a_widened_unet(semantic_run) -> None:
    from sdtune.formats.exporters import EXPORTERS

    ctx = context_from_module(semantic_run.module, name="x", resolution=64, num_train_images=4)
    for fmt in [*LORA_FORMATS, "single_file"]:
        with pytest.raises(ExportError, match="format=merged"):
            EXPORTERS[fmt](ctx, semantic_run.run_dir / "refused" / fmt)
    assert not (semantic_run.run_dir / "refused").exists()


def test_sdtune_export_restores_the_new_input_weights(semantic_run, tmp_path) -> None:
    from sdtune.export import export

    out = tmp_path / "pipeline"
    export(compose_config("export", [f"source={semantic_run.run_dir}", "format=merged", f"out={out}"]))
    restored = StableDiffusionPipeline.from_pretrained(out).unet.conv_in.weight
    trained = StableDiffusionPipeline.from_pretrained(semantic_run.run_dir / "pipeline").unet.conv_in.weight
    torch.testing.assert_close(restored, trained)


def test_sample_from_a_map(semantic_run, tmp_path) -> None:
    maps = sorted((data_root(semantic_run) / "maps").glob("*.png"))
    cfg = sample_cfg(semantic_run, tmp_path / "a.png", f"map={maps[0]}", "condition_guidance={map: 2.0}")
    paths = sample(cfg)
    image = np.asarray(Image.open(paths[0]))
    assert image.shape == (64, 64, 3) and image.std() > 0

    with pytest.raises(ConfigError, match="pass map=<file>"):
        sample(sample_cfg(semantic_run, tmp_path / "b.png"))
    bad = tmp_path / "bad_map.png"
    Image.fromarray(np.full((64, 64), 9, np.uint8)).save(bad)
    with pytest.raises(ConfigError, match=r"bad_map.png: class id\(s\) \[9\]"):
        sample(sample_cfg(semantic_run, tmp_path / "c.png", f"map={bad}"))


# ---- image edits -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def edit_run(tmp_path_factory, cache_dir):
    return train_run(tmp_path_factory, "edit", "+experiment=image_edit")


def test_image_edit_run_and_its_pipeline(edit_run, tmp_path) -> None:
    from diffusers import StableDiffusionInstructPix2PixPipeline

    run = edit_run.run_dir
    exports = json.loads((run / "manifest.json").read_text())["exports"]
    assert exports == [{"format": "merged", "path": "pipeline"}]
    assert Image.open(run / "samples" / "step_000001.png").size == (128, 64), "source beside the sample"
    source = sorted((data_root(edit_run) / "source").glob("*.png"))[0]
    paths = sample(sample_cfg(edit_run, tmp_path / "edit.png", f"image={source}", "prompt=make it blue"))
    assert np.asarray(Image.open(paths[0])).shape == (64, 64, 3)

    # The exported model follows InstructPix2Pix's conventions, so diffusers' own pipeline runs it.
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(run / "pipeline")
    assert pipe.unet.config.in_channels == 8
    edited = pipe("make it blue", image=Image.open(source), num_inference_steps=2, output_type="np").images
    assert edited.shape == (1, 64, 64, 3)


# ---- representation vectors --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def representation_run(tmp_path_factory, cache_dir):
    return train_run(tmp_path_factory, "representation", "+experiment=lora", "conditioning=representation")


def test_representation_projection_trains_and_is_saved(representation_run, tmp_path) -> None:
    from safetensors.torch import load_file

    run, module = representation_run.run_dir, representation_run.module
    proj = module.conditioning.components["representation"].proj
    optimizer = representation_run.trainer.optimizers[0]
    assert int(optimizer.state[proj.weight]["step"]) == 1, "the projection is not optimised"
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    torch.testing.assert_close(checkpoint["conditioning.components.representation.proj.weight"], proj.weight)

    manifest = json.loads((run / "manifest.json").read_text())
    assert {"format": "conditioning", "path": "conditioning.safetensors"} in manifest["exports"]
    saved = load_file(str(run / "conditioning.safetensors"))
    names = ("proj.weight", "proj.bias", "norm.weight", "norm.bias")
    assert set(saved) == {f"components.representation.{name}" for name in names}
    torch.testing.assert_close(saved["components.representation.proj.weight"], proj.weight)

    vector = sorted((data_root(representation_run) / "images").glob("*.npy"))[0]
    paths = sample(sample_cfg(representation_run, tmp_path / "r.png", f"representation={vector}"))
    assert np.asarray(Image.open(paths[0])).shape == (64, 64, 3)


def test_sdtune_export_keeps_the_projection_beside_the_export(representation_run, tmp_path) -> None:
    from safetensors.torch import load_file

    from sdtune.export import export

    proj = representation_run.module.conditioning.components["representation"].proj
    run = representation_run.run_dir
    kohya = export(
        compose_config("export", [f"source={run}", "format=kohya", f"out={tmp_path / 'r.safetensors'}"])
    )
    peft = export(compose_config("export", [f"source={run}", "format=peft", f"out={tmp_path / 'peft'}"]))
    for beside in (tmp_path / "r.conditioning.safetensors", peft / "conditioning.safetensors"):
        torch.testing.assert_close(
            load_file(str(beside))["components.representation.proj.weight"], proj.weight
        )
    assert kohya.is_file()
    args = [f"source={run}", "format=kohya", f"out={tmp_path / 'r2.safetensors'}"]
    (tmp_path / "r2.conditioning.safetensors").write_text("mine")
    with pytest.raises(ConfigError, match="r2.conditioning.safetensors.*already exists"):
        export(compose_config("export", args))
    assert (tmp_path / "r2.conditioning.safetensors").read_text() == "mine"


def test_evaluate_scores_map_iou_of_a_map_conditioned_run(semantic_run, tmp_path: Path) -> None:
    from sdtune.evaluate import run

    cfg = compose_config(
        "evaluate",
        [
            f"source={semantic_run.run_dir}",
            f"out={tmp_path}",
            "shapes=[square]",
            "colours=[red]",
            "backgrounds=[white, black]",
            "per_prompt=1",
            "steps=2",
            "judge_renders=0",
        ],
    )
    report = json.loads(run(cfg).read_text())
    assert report["map_iou"]["n"] == 2 and 0.0 <= report["map_iou"]["mean"] <= 1.0
    backgrounds = [s["prompt"].split(" on ")[1] for s in report["samples"]]
    assert backgrounds == ["a white background", "a black background"]
    assert all("map_iou" in s for s in report["samples"])
