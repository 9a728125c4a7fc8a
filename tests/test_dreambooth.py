"""DreamBooth: the prior-preservation loss, instance + class batches, data checks, end-to-end runs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune.config import ConfigError
from sdtune.data.class_images import default_class_dir, model_renderer
from sdtune.data.dreambooth import DreamBoothDataModule
from sdtune.data.records import DataError
from sdtune.losses import prior_preservation_loss
from sdtune.train import train

from .conftest import compose_config

FAST = [
    "+experiment=dreambooth",
    "trainer.max_steps=3",
    "trainer.log_every_n_steps=1",
    "data.num_class_images=4",
    "data.class_generation.steps=2",
    "data.batch_size=2",
    "sampling.steps=2",
    "sampling.per_prompt=1",
    "sampling.every_n_steps=0",
    "logger=csv",
]


# ---- the loss ----------------------------------------------------------------------------------------------


def test_prior_preservation_loss_on_known_values() -> None:
    losses = torch.tensor([1.0, 3.0, 2.0, 10.0, 4.0])
    is_class = torch.tensor([False, False, True, True, False])
    total, instance, prior = prior_preservation_loss(losses, is_class, 0.5)
    assert instance.item() == pytest.approx((1 + 3 + 4) / 3)
    assert prior.item() == pytest.approx((2 + 10) / 2)
    assert total.item() == pytest.approx((1 + 3 + 4) / 3 + 0.5 * (2 + 10) / 2)


@pytest.fixture
def module(train_cfg, cache_dir):
    """A full-fine-tuning module on the tiny stack, with a DreamBooth config."""
    from sdtune.conditioning import build_conditioning
    from sdtune.models import load_stack
    from sdtune.models.adapters import apply_method
    from sdtune.module import DiffusionModule

    cfg = train_cfg("+experiment=dreambooth", "method=full")
    stack = load_stack(cfg.model, cache_dir)
    apply_method(stack, cfg.method)
    return DiffusionModule(stack, build_conditioning(cfg.conditioning, stack), cfg.method, cfg.loss)


def dreambooth_batch(instances: int = 2, classes: int = 2) -> dict:
    generator = torch.Generator().manual_seed(0)
    return {
        "pixel_values": torch.rand(instances + classes, 3, 64, 64, generator=generator) * 2 - 1,
        "caption": ["a sks star"] * instances + ["a star"] * classes,
        "is_class": torch.arange(instances + classes) >= instances,
    }


def test_module_adds_the_weighted_class_half(module, monkeypatch) -> None:
    per_sample = torch.tensor([1.0, 2.0, 3.0, 5.0])
    monkeypatch.setattr(module, "per_sample_loss", lambda latents, conditions, unconditional: per_sample)
    module.method.prior_loss_weight = 0.5
    loss, parts = module.batch_loss(dreambooth_batch())
    assert loss.item() == pytest.approx((1 + 2) / 2 + 0.5 * (3 + 5) / 2)
    assert parts["instance_loss"].item() == pytest.approx(1.5) and parts["prior_loss"].item() == 4.0
    plain = {k: v for k, v in dreambooth_batch().items() if k != "is_class"}
    assert module.batch_loss(plain)[0].item() == pytest.approx(per_sample.mean().item())


def test_prior_loss_weight_changes_the_gradient_linearly(module) -> None:
    batch = dreambooth_batch(1, 1)

    def gradient(weight: float) -> torch.Tensor:
        module.method.prior_loss_weight = weight
        module.zero_grad()
        torch.manual_seed(0)  # same noise, timesteps and caption dropout for every weight
        module.batch_loss(batch)[0].backward()
        return torch.cat([p.grad.flatten() for p in module.unet.parameters()])

    g0, g1, g3 = gradient(0.0), gradient(1.0), gradient(3.0)
    assert (g1 - g0).abs().max() > 1e-6, "the class half does not reach the gradient"
    torch.testing.assert_close(g3 - g0, 3 * (g1 - g0), atol=1e-5, rtol=1e-3)


# ---- the data ----------------------------------------------------------------------------------------------


def images(folder: Path, count: int, prefix: str = "img") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (80, 64), (40 * i, 0, 0)).save(folder / f"{prefix}_{i}.png")
    return folder


def datamodule(tmp_path: Path, **kwargs) -> DreamBoothDataModule:
    settings = {
        "name": "dreambooth",
        "instance_dir": str(images(tmp_path / "instance", 3)),
        "instance_prompt": "a sks star",
        "class_prompt": "a star",
        "class_dir": str(images(tmp_path / "class", 5, "class")),
        "num_class_images": 5,
        "class_generation": {"batch_size": 2},
        "resolution": 32,
        "batch_size": 2,
        **kwargs,
    }
    return DreamBoothDataModule(**settings)


def test_batches_hold_instance_then_class_samples(tmp_path: Path) -> None:
    dm = datamodule(tmp_path)
    dm.setup()
    dm.prepare_with_model(None, None, "cpu")  # the class folder is complete: nothing to generate
    assert len(dm.dataset) == 5 and dm.num_samples == 3
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    assert batch["caption"] == ["a sks star", "a sks star", "a star", "a star"]
    assert batch["is_class"].tolist() == [False, False, True, True]


def test_without_class_prompt_there_is_no_class_half(tmp_path: Path) -> None:
    dm = datamodule(tmp_path, class_prompt=None, class_dir=None)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["caption"] == ["a sks star"] * 2 and "is_class" not in batch


def test_unreadable_instance_images_are_listed(tmp_path: Path) -> None:
    dm = datamodule(tmp_path)
    (tmp_path / "instance" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png"):
        dm.setup()


def test_instance_dir_problems_are_reported_before_any_model_loads(train_cfg, tmp_path, monkeypatch) -> None:
    import sdtune.models

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the data was checked")

    monkeypatch.setattr(sdtune.models, "load_stack", no_loading)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    for folder, reason in ((tmp_path / "missing", "does not exist"), (empty, "no images")):
        with pytest.raises(ConfigError) as info:
            train(train_cfg(*FAST, f"data.instance_dir={folder}", "data.class_prompt=null"))
        assert "data.instance_dir" in str(info.value) and reason in str(info.value)
    with pytest.raises(ConfigError) as info:
        train(
            train_cfg(
                *FAST,
                "data.num_class_images=0",
                "data.instance_prompt=''",
                "data.class_generation.guidance_rescale=1.5",
            )
        )
    assert "data.num_class_images" in str(info.value) and "data.instance_prompt" in str(info.value)
    assert "data.class_generation.guidance_rescale: must be a number in [0, 1]" in str(info.value)


def test_class_images_are_sampled_with_the_guidance_rescale(tiny_dir: Path) -> None:
    """Class images come from the sampler with `class_generation.guidance_rescale`; a rescaled set lives in
    its own cache folder, and leaving it at 0 keeps the folder of older runs."""
    from omegaconf import OmegaConf

    from sdtune.sample import load_source
    from sdtune.sampling import generate, make_scheduler, to_pil

    prompt = "a red circle on a gray background"
    stack, conditioning, _ = load_source(compose_config("sample", ["source=tiny", "out=unused.png"]))
    settings = {"scheduler": "ddim", "steps": 3, "guidance": 6.0, "negative_prompt": "", "seed": 5}
    rendered = {}
    for phi in (0.0, 0.7):
        generation = OmegaConf.create({**settings, "guidance_rescale": phi})
        rendered[phi] = np.stack(
            [np.asarray(im) for im in model_renderer(stack, conditioning, prompt, generation, 64)([0, 1])]
        )
    direct = generate(
        stack.unet,
        stack.vae,
        conditioning,
        {"caption": [prompt] * 2, "negative_caption": [""] * 2},
        scheduler=make_scheduler("ddim", stack.scheduler_config, seed=5),
        steps=3,
        guidance=6.0,
        guidance_rescale=0.7,
        seed=5,
        height=64,
        width=64,
        noise_seeds=[5, 6],
    )
    assert np.array_equal(rendered[0.7], np.stack([np.asarray(im) for im in to_pil(direct)]))
    assert np.abs(rendered[0.7].astype(int) - rendered[0.0]).max() > 2

    def folder(**extra) -> Path:
        return default_class_dir(
            Path("/cache"), "tiny", "a star", 64, OmegaConf.create({**settings, **extra})
        )

    assert folder(guidance_rescale=0.0) == folder() != folder(guidance_rescale=0.7)


# ---- end to end --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    """`+experiment=dreambooth` with LoRA, then with method=full (which reuses the class images)."""
    root = tmp_path_factory.mktemp("dreambooth")
    lora = train(compose_config("train", FAST, root / "lora"))
    class_files = sorted((cache_dir / "class-images").glob("*/class_*.png"))
    stamps = {p: p.stat().st_mtime_ns for p in class_files}
    full = train(compose_config("train", [*FAST, "method=full"], root / "full"))
    return {"lora": lora, "full": full, "class_files": class_files, "stamps": stamps}


def test_class_images_are_generated_once_and_reused(runs) -> None:
    assert [p.name for p in runs["class_files"]] == [f"class_{i:05d}.png" for i in range(4)]
    assert Image.open(runs["class_files"][0]).size == (64, 64)
    assert {p: p.stat().st_mtime_ns for p in runs["class_files"]} == runs["stamps"]  # not rewritten


@pytest.mark.parametrize(
    "method, export", [("lora", "lora/pytorch_lora_weights.safetensors"), ("full", "pipeline")]
)
def test_experiment_runs_end_to_end(runs, method: str, export: str) -> None:
    run_dir = runs[method].run_dir
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["method"] == method and manifest["global_step"] == 3
    assert manifest["num_train_images"] == 8  # the synthetic purple stars
    assert manifest["exports"][0]["path"] == export and (run_dir / export).exists()
    assert (run_dir / "samples" / "step_000003.png").is_file()
    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    logged = [r for r in rows if r.get("train/prior_loss")]
    assert len(logged) == 3
    for row in logged:  # prior_loss_weight = 1: the loss is the sum of its halves
        total = float(row["train/instance_loss"]) + float(row["train/prior_loss"])
        assert float(row["train/loss"]) == pytest.approx(total, rel=1e-5)


def test_an_adapter_variant_trains_with_prior_preservation(train_cfg, cache_dir) -> None:
    """DoRA (a peft variant, as LoHa and LoKr) on DreamBooth data: its own weights train on instance + class
    batches, the prior loss is logged, and the diffusers export holds the DoRA magnitudes."""
    from safetensors.torch import load_file

    run = train(train_cfg(*FAST, "method.variant=dora", "export.formats=[diffusers]"))
    trainable = run.module.trainable_parameters()
    assert any("lora_magnitude_vector" in name for name in trainable)
    rows = list(csv.DictReader((run.run_dir / "csv" / "metrics.csv").open()))
    assert len([r for r in rows if r.get("train/prior_loss")]) == 3
    exported = load_file(str(run.run_dir / "lora" / "pytorch_lora_weights.safetensors"))
    assert any("magnitude" in key for key in exported)
