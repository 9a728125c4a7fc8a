"""Full fine-tuning on the tiny stack: what trains, the EMA in checkpoints and on resume, the pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from omegaconf import OmegaConf

from sdtune.callbacks.ema import EMACallback
from sdtune.config import ConfigError, validate
from sdtune.train import train

from .conftest import compose_config

FAST = [
    "+experiment=full",
    "trainer.max_steps=4",
    "data.num_images=8",
    "data.batch_size=4",
    "sampling.steps=2",
    "sampling.per_prompt=1",
    "sampling.every_n_steps=0",
    "callbacks.checkpoint.every_n_train_steps=2",
    "logger=none",
]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, cache_dir):
    run_dir = tmp_path_factory.mktemp("full") / "run"
    return train(compose_config("train", [*FAST, "method.lr=1e-3"], run_dir))


@pytest.fixture(scope="module")
def base(tiny_dir) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(tiny_dir)


def ema_of(run) -> EMACallback:
    return next(c for c in run.trainer.callbacks if isinstance(c, EMACallback))


def test_run_directory_and_manifest(full_run) -> None:
    run = full_run.run_dir
    for path in ("checkpoints/last.ckpt", "pipeline/model_index.json", "samples/step_000004.png"):
        assert (run / path).is_file(), path
    assert not (run / "lora").exists()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["method"] == "full" and manifest["global_step"] == 4
    assert manifest["exports"] == [{"format": "pipeline", "path": "pipeline"}]
    assert manifest["ema_exported"] is True


def test_every_unet_weight_trains_and_nothing_frozen_changes(full_run, base) -> None:
    module = full_run.module
    trained = dict(module.unet.named_parameters())
    reference = dict(base.unet.named_parameters())
    assert trained.keys() == reference.keys()
    unchanged = [name for name, p in trained.items() if torch.equal(p.detach(), reference[name])]
    assert not unchanged, f"U-Net weights that did not train: {unchanged[:5]}"
    for frozen, original in ((module.vae, base.vae), (module.stack.text_encoder, base.text_encoder)):
        state, expected = frozen.state_dict(), original.state_dict()
        assert state.keys() == expected.keys()
        for key, value in state.items():
            assert torch.equal(value, expected[key]), f"frozen weight {key} changed"
    assert set(module.trainable_parameters()) == {f"unet.{name}" for name in trained}


def test_checkpoint_holds_the_weights_and_the_ema(full_run) -> None:
    checkpoint = torch.load(full_run.run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    trainable = full_run.module.trainable_parameters()
    assert set(checkpoint["state_dict"]) == set(trainable)
    state = checkpoint["callbacks"]["EMACallback"]
    assert state["updates"] == 4
    assert list(state["shadow"]) == list(trainable)
    ema = ema_of(full_run)
    for saved, current in zip(state["shadow"].values(), ema.ema.shadow_params):
        assert torch.equal(saved, current)


def test_exported_pipeline_holds_the_ema_weights_and_samples(full_run) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(full_run.run_dir / "pipeline")
    ema = ema_of(full_run)
    exported = dict(pipe.unet.named_parameters())
    trained = dict(full_run.module.unet.named_parameters())
    differs = 0
    for name, average in zip(ema.names, ema.ema.shadow_params):
        key = name.removeprefix("unet.")
        assert torch.equal(exported[key], average), key
        differs += not torch.equal(exported[key], trained[key].detach())
    assert differs > 0, "the export equals the raw trained weights, not their average"
    images = pipe(
        "a red circle on a gray background",
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


def test_samples_during_training_use_the_ema_weights(full_run, tmp_path: Path) -> None:
    from sdtune.callbacks.samples import SampleCallback

    module, trainer = full_run.module, full_run.trainer
    callback = next(c for c in trainer.callbacks if isinstance(c, SampleCallback))
    seen = []
    original_sample, original_out = module.sample, callback.out
    module.sample = lambda batch, *args: (
        seen.append(module.unet.conv_in.weight.detach().clone())
        or (torch.zeros(len(batch["caption"]), 3, 8, 8))
    )
    callback.out = tmp_path
    try:
        callback.sample(trainer, module)
    finally:
        module.sample, callback.out = original_sample, original_out
    average = dict(zip(ema_of(full_run).names, ema_of(full_run).ema.shadow_params))["unet.conv_in.weight"]
    assert torch.equal(seen[0], average)
    assert not torch.equal(module.unet.conv_in.weight.detach(), average)  # trained weights are back


def test_resume_restores_the_ema(full_run, train_cfg) -> None:
    run = train(
        train_cfg(
            *FAST,
            "method.lr=1e-3",
            "trainer.max_steps=5",
            "sampling.prompts=[]",
            f"resume={full_run.run_dir}",
        )
    )
    checkpoint = torch.load(run.run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 5
    # A fresh EMA would count 1 update (step 5); the restored one goes on from 4.
    assert checkpoint["callbacks"]["EMACallback"]["updates"] == 5


def test_sample_cli_loads_a_full_run(full_run, tmp_path: Path) -> None:
    from sdtune.sample import sample

    # The CLI saves the run's config in .hydra/; the in-process run above does not.
    (full_run.run_dir / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(compose_config("train", FAST), full_run.run_dir / ".hydra" / "config.yaml")
    out = tmp_path / "x.png"
    overrides = [f"source={full_run.run_dir}", "prompt=a red circle", "steps=2", f"out={out}"]
    cfg = compose_config("sample", overrides)
    assert sample(cfg) == [out] and out.is_file()


def test_export_cli_writes_the_checkpoints_ema_unless_told_not_to(full_run, tmp_path: Path) -> None:
    from sdtune.export import export

    (full_run.run_dir / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(compose_config("train", FAST), full_run.run_dir / ".hydra" / "config.yaml")
    checkpoint = torch.load(full_run.run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    expected = {
        True: checkpoint["callbacks"]["EMACallback"]["shadow"],
        False: checkpoint["state_dict"],
    }
    for ema in (True, False):
        out = tmp_path / f"ema_{ema}"
        args = [f"source={full_run.run_dir}", "format=pipeline", f"out={out}", f"ema={str(ema).lower()}"]
        export(compose_config("export", args))
        unet = dict(StableDiffusionPipeline.from_pretrained(out).unet.named_parameters())
        for name in ("unet.conv_in.weight", "unet.up_blocks.0.resnets.0.conv1.weight"):
            assert torch.equal(unet[name.removeprefix("unet.")], expected[ema][name]), (ema, name)
    assert not torch.equal(expected[True]["unet.conv_in.weight"], expected[False]["unet.conv_in.weight"])
    with pytest.raises(ConfigError, match="ema: must be true or false"):
        export(
            compose_config("export", [f"source={full_run.run_dir}", "format=pipeline", "out=x", "ema=maybe"])
        )


def test_gradient_checkpointing_and_text_encoder_option(train_cfg, cache_dir) -> None:
    from sdtune.models import load_stack
    from sdtune.models.adapters import apply_method

    cfg = train_cfg("method=full", "method.gradient_checkpointing=true", "method.train_text_encoder=true")
    stack = load_stack(cfg.model, cache_dir)
    apply_method(stack, cfg.method)
    assert stack.unet.is_gradient_checkpointing and stack.text_encoder.is_gradient_checkpointing
    assert all(p.requires_grad for p in stack.unet.parameters())
    assert all(p.requires_grad for p in stack.text_encoder.parameters())
    assert not any(p.requires_grad for p in stack.vae.parameters())


def test_bad_full_settings_are_reported(train_cfg) -> None:
    with pytest.raises(ConfigError) as info:
        validate(
            train_cfg(
                "method=full",
                "method.ema.decay=1.5",
                "method.ema.update_every=0",
                "method.ema.device=gpu",
                "export.formats=[pipeline,nope]",
            )
        )
    message = str(info.value)
    for key in ("method.ema.decay", "method.ema.update_every", "method.ema.device", "export.formats"):
        assert key in message
    with pytest.raises(ConfigError, match="method=full trains no adapter"):
        validate(train_cfg("method=full", "export.formats=[diffusers]"))
