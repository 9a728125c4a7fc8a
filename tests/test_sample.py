"""`sdtune.sample`: every scheduler name produces an image; bad names are refused before loading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdtune.config import ConfigError
from sdtune.sample import sample
from sdtune.sampling import SCHEDULERS

from .conftest import compose_config


def sample_cfg(*overrides: str):
    return compose_config("sample", list(overrides))


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_each_scheduler_produces_an_image(scheduler: str, tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / f"{scheduler}.png"
    paths = sample(
        sample_cfg("source=tiny", "prompt=a red circle", f"scheduler={scheduler}", "steps=3", f"out={out}")
    )
    assert paths == [out]
    image = np.asarray(Image.open(out))
    assert image.shape == (64, 64, 3)
    assert image.std() > 0


def test_a_local_pipeline_folder_samples_at_its_own_resolution(tiny_dir: Path, tmp_path: Path) -> None:
    # diffusers' default, U-Net sample size × VAE scale: 64 px for the tiny stack, not SD1.5's 512
    out = tmp_path / "folder.png"
    sample(sample_cfg(f"source={tiny_dir}", "prompt=a red circle", "steps=2", f"out={out}"))
    assert Image.open(out).size == (64, 64)


def test_seeds_make_samples_reproducible_and_distinct(tiny_dir: Path, tmp_path: Path) -> None:
    common = ["source=tiny", "prompt=a blue star", "scheduler=euler_a", "steps=3", "num_images=2"]
    first = sample(sample_cfg(*common, f"out={tmp_path / 'a'}"))
    second = sample(sample_cfg(*common, f"out={tmp_path / 'b'}"))
    pixels = [[np.asarray(Image.open(p)) for p in paths] for paths in (first, second)]
    assert np.array_equal(pixels[0][0], pixels[1][0]) and np.array_equal(pixels[0][1], pixels[1][1])
    assert not np.array_equal(pixels[0][0], pixels[0][1])


def test_bad_inputs_are_refused_before_loading(tmp_path: Path) -> None:
    existing = tmp_path / "taken.png"
    existing.write_bytes(b"user file")
    with pytest.raises(ConfigError) as info:
        sample(
            sample_cfg(
                "source=tiny",
                "prompt=x",
                "scheduler=plms",
                f"lora={tmp_path}/none.safetensors",
                f"out={existing}",
                "condition_guidance={source: 1.5}",
            )
        )
    message = str(info.value)
    assert "condition_guidance: unknown condition(s) ['source']; this model has ['text']" in message
    assert "scheduler" in message and "euler_a" in message
    assert "none.safetensors" in message
    assert "overwrite=true" in message
    assert existing.read_bytes() == b"user file"


def test_numbers_of_the_wrong_type_are_named_not_a_traceback(tmp_path: Path) -> None:
    bad = ["guidance=abc", "steps=2.5", "num_images=0", "seed=x", "resolution=30", "overwrite=maybe"]
    bad += ["guidance_rescale=-0.1"]
    with pytest.raises(ConfigError) as info:
        sample(sample_cfg("source=tiny", "prompt=x", f"out={tmp_path / 'x.png'}", *bad))
    message = str(info.value)
    assert "guidance: must be a number >= 0" in message and "got 'abc'" in message
    assert "steps: must be an integer >= 1, got 2.5" in message
    assert "num_images: must be an integer >= 1, got 0" in message
    assert "seed: must be an integer, got 'x'" in message
    assert "resolution: must be null or a positive multiple of 8, got 30" in message
    assert "overwrite: must be true or false, got 'maybe'" in message
    assert "guidance_rescale: must be a number in [0, 1], e.g. 0.7, got -0.1" in message


def test_a_source_that_is_no_run_and_no_pipeline_is_named(tmp_path: Path) -> None:
    stopped = tmp_path / "run"
    (stopped / "checkpoints").mkdir(parents=True)
    for source, expected in ((tmp_path / "absent", "does not exist"), (stopped, "no manifest.json")):
        with pytest.raises(ConfigError, match=expected):
            sample(sample_cfg(f"source={source}", "prompt=x", f"out={tmp_path / 'out'}"))


@pytest.mark.parametrize("index", ["{broken", '["a list"]'])
def test_a_pipeline_folder_with_a_broken_model_index_is_named(index: str, tmp_path: Path) -> None:
    folder = tmp_path / "pipeline"
    folder.mkdir()
    (folder / "model_index.json").write_text(index)
    with pytest.raises(ConfigError, match=r"model_index\.json.*family=sd1\|sdxl"):
        sample(sample_cfg(f"source={folder}", "prompt=x", f"out={tmp_path / 'out'}"))


@pytest.mark.parametrize(
    ("manifest", "config"),
    [
        ("{exports: [", "model: {}"),
        ('{"no_exports": 1}', "model: {}"),
        (
            '{"exports": [{"format": "diffusers", "path": "lora/pytorch_lora_weights.safetensors"}]}',
            "model: [",
        ),
    ],
)
def test_a_run_with_an_unreadable_manifest_or_config_is_named(
    manifest: str, config: str, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / "manifest.json").write_text(manifest)
    (run / ".hydra" / "config.yaml").write_text(config)
    with pytest.raises(ConfigError, match=r"unreadable (manifest\.json|\.hydra/config\.yaml)"):
        sample(sample_cfg(f"source={run}", "prompt=x", f"out={tmp_path / 'out'}"))


def test_a_run_without_a_loadable_export_is_refused_not_sampled_as_the_base(tmp_path: Path) -> None:
    """A run that exported only a peft folder (or nothing) would otherwise be sampled as the bare base."""
    import json

    from sdtune.evaluate import run as evaluate

    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"exports": [{"format": "peft", "path": "lora/peft"}]}))
    with pytest.raises(ConfigError, match=r"exported \['peft'\].*sdtune.export source="):
        sample(sample_cfg(f"source={run}", "prompt=x", f"out={tmp_path / 'out'}"))
    with pytest.raises(ConfigError, match=r"exported \['peft'\]"):
        evaluate(compose_config("evaluate", [f"source={run}", f"out={tmp_path / 'eval'}"]))


def test_a_missing_required_key_is_named_not_a_traceback() -> None:
    with pytest.raises(ConfigError, match=r"out: required; set it on the command line \(out=\.\.\.\)"):
        sample(sample_cfg("source=tiny", "prompt=a red circle"))


def test_guidance_rescale_matches_the_diffusers_pipeline(tiny_dir: Path) -> None:
    """The same noise, prompt and DDIM steps through diffusers' pipeline (its `guidance_rescale`) and through
    sdtune's loop give the same image, and the rescale changes it."""
    import torch
    from diffusers import StableDiffusionPipeline

    from sdtune.sample import load_source
    from sdtune.sampling import generate, make_scheduler

    prompt = "a red circle on a gray background"
    stack, conditioning, _ = load_source(sample_cfg("source=tiny", f"prompt={prompt}", "out=unused.png"))
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dir), safety_checker=None)
    noise = torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(3))
    ours = {}
    for phi in (0.0, 0.7):
        ours[phi] = generate(
            stack.unet,
            stack.vae,
            conditioning,
            {"caption": [prompt], "negative_caption": [""]},
            scheduler=make_scheduler("ddim", stack.scheduler_config),
            steps=5,
            guidance=6.0,
            seed=3,
            height=64,
            width=64,
            guidance_rescale=phi,
        )
        pipe.scheduler = make_scheduler("ddim", stack.scheduler_config)
        reference = pipe(
            prompt,
            negative_prompt="",
            latents=noise[None],
            num_inference_steps=5,
            guidance_scale=6.0,
            guidance_rescale=phi,
            output_type="pt",
        ).images
        torch.testing.assert_close(ours[phi], reference, atol=1e-5, rtol=0)
    assert (ours[0.7] - ours[0.0]).abs().max() > 0.01


def test_guidance_rescale_gives_the_conditional_spread_and_is_off_at_zero() -> None:
    import torch

    from sdtune.sampling import rescale_guidance

    gen = torch.Generator().manual_seed(0)
    conditional = torch.randn(3, 4, 8, 8, generator=gen)
    guided = 5 * torch.randn(3, 4, 8, 8, generator=gen)
    assert torch.equal(rescale_guidance(guided, conditional, 0.0), guided)
    full = rescale_guidance(guided, conditional, 1.0)
    torch.testing.assert_close(full.std(dim=(1, 2, 3)), conditional.std(dim=(1, 2, 3)))
    torch.testing.assert_close(rescale_guidance(guided, conditional, 0.5), (full + guided) / 2)
