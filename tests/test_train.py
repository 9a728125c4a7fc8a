"""End-to-end LoRA training on the embedded tiny stack: run directory, manifest, exports, resume, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from sdtune.train import train

FAST = [
    "+experiment=lora",
    "trainer.max_steps=4",
    "data.num_images=16",
    "data.batch_size=4",
    "sampling.every_n_steps=2",
    "sampling.steps=2",
    "sampling.per_prompt=1",
    "callbacks.checkpoint.every_n_train_steps=2",
]


def unet_inputs(unet, text_encoder) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, unet.config.in_channels, 8, 8, generator=generator)
    ids = torch.randint(0, text_encoder.config.vocab_size, (2, 77), generator=generator)
    return latents, torch.tensor([100, 700]), ids


@torch.no_grad()
def outputs(unet, text_encoder) -> tuple[torch.Tensor, torch.Tensor]:
    latents, t, ids = unet_inputs(unet, text_encoder)
    hidden = text_encoder(ids)[0]
    return unet(latents, t, encoder_hidden_states=hidden).sample, hidden


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, cache_dir):
    from .conftest import compose_config

    run_dir = tmp_path_factory.mktemp("lora") / "run"
    cfg = compose_config(
        "train",
        [
            *FAST,
            "method.rank=4",
            "method.alpha=2",
            "method.lr=1e-2",
            "method.train_text_encoder=true",
            "method.lr_scheduler=linear",
        ],
        run_dir,
    )
    return train(cfg)


def test_run_directory_contents(lora_run) -> None:
    run = lora_run.run_dir
    for path in (
        "checkpoints/last.ckpt",
        "lora/pytorch_lora_weights.safetensors",
        "samples/step_000002.png",
        "samples/step_000004.png",
        "manifest.json",
    ):
        assert (run / path).is_file(), path
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb")), "no W&B run files"
    assert list((run / "wandb").glob("offline-run-*/files/media/images/samples_*.png")), (
        "no W&B sample images"
    )
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["global_step"] == 4
    assert manifest["world_size"] == 1
    assert manifest["method"] == "lora"
    assert Path(manifest["base_model"]).is_dir() and Path(manifest["base_model"]).is_absolute()
    assert manifest["exports"] == [
        {"format": "diffusers", "path": "lora/pytorch_lora_weights.safetensors"},
        {"format": "kohya", "path": "lora/kohya.safetensors"},
    ]
    assert manifest["sdtune_version"]


def test_the_exports_go_to_wandb_as_an_artifact(lora_run) -> None:
    # Offline runs keep their records in the run-<id>.wandb log (protobuf, strings stored as they are): the
    # artifact's name and its files are there for `wandb sync` to upload.
    (log,) = (lora_run.run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    records = log.read_bytes()
    run_id = log.stem.removeprefix("run-")
    assert f"lora-{run_id}".encode() in records, "no artifact named after the run"
    manifest = json.loads((lora_run.run_dir / "manifest.json").read_text())
    for export in manifest["exports"]:
        assert Path(export["path"]).name.encode() in records, export


def test_each_run_in_one_process_logs_to_its_own_wandb_run(tmp_path: Path) -> None:
    """As a Hydra sweep with the basic launcher does: two jobs, one process. Lightning reuses a W&B run still
    in progress, so each job must end its own."""
    from .conftest import compose_config

    fast = ["+experiment=lora", "trainer.max_steps=1", "trainer.log_every_n_steps=1", "data.num_images=4"]
    fast += ["sampling.every_n_steps=0"]
    for name in ("first", "second"):
        train(compose_config("train", fast, tmp_path / name))
    first, second = ((tmp_path / n / "wandb").glob("offline-run-*/run-*.wandb") for n in ("first", "second"))
    (first,), (second,) = list(first), list(second)
    assert first.stem != second.stem
    # W&B's writer process can still be flushing the run's log when finish() returns (seen once under load:
    # the file held only its header); give it time before concluding the job logged elsewhere.
    deadline = time.monotonic() + 60
    while b"train/loss" not in second.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert b"train/loss" in second.read_bytes(), "the second job logged nothing to its own run"


def test_only_lora_parameters_changed(lora_run, tiny_dir) -> None:
    base = StableDiffusionPipeline.from_pretrained(tiny_dir)
    module = lora_run.module
    for trained, original in ((module.unet, base.unet), (module.stack.text_encoder, base.text_encoder)):
        reference = original.state_dict()
        frozen = {
            k.replace(".base_layer", ""): v for k, v in trained.state_dict().items() if "lora_" not in k
        }
        assert frozen.keys() == reference.keys()
        for key, value in frozen.items():
            assert torch.equal(value, reference[key]), f"frozen weight {key} changed"
    trainable = module.trainable_parameters()
    assert trainable and all("lora_" in name for name in trainable)
    assert any("text_encoder" in name for name in trainable)
    lora_b = [p for name, p in trainable.items() if "lora_B" in name]
    assert all(p.abs().sum() > 0 for p in lora_b), "a LoRA B matrix never moved from its zero init"
    checkpoint = torch.load(lora_run.run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert set(checkpoint["state_dict"]) == set(trainable)


def test_exported_lora_reproduces_the_trained_model(lora_run, tiny_dir) -> None:
    module = lora_run.module
    module.eval()
    trained_unet, trained_text = outputs(module.unet, module.stack.text_encoder)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir)
    base_unet, base_text = outputs(pipe.unet, pipe.text_encoder)
    path = lora_run.run_dir / "lora" / "pytorch_lora_weights.safetensors"
    with safe_open(str(path), "pt") as f:
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    assert metadata["unet.r"] == 4 and metadata["unet.lora_alpha"] == 2
    pipe.load_lora_weights(path)
    loaded_unet, loaded_text = outputs(pipe.unet, pipe.text_encoder)

    torch.testing.assert_close(loaded_text, trained_text, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(loaded_unet, trained_unet, atol=1e-5, rtol=1e-4)
    assert (loaded_unet - base_unet).abs().max() > 1e-3
    assert (loaded_text - base_text).abs().max() > 1e-3


def test_resume_continues_step_count_and_schedule(lora_run, train_cfg, tmp_path) -> None:
    cfg = train_cfg(
        *FAST,
        "trainer.max_steps=6",
        "method.rank=4",
        "method.alpha=2",
        "method.lr=1e-2",
        "method.train_text_encoder=true",
        "method.lr_scheduler=linear",
        "logger=none",
        f"resume={lora_run.run_dir}",
    )
    run = train(cfg)
    manifest = json.loads((run.run_dir / "manifest.json").read_text())
    assert manifest["global_step"] == 6
    first = torch.load(lora_run.run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    second = torch.load(run.run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert first["lr_schedulers"][0]["last_epoch"] == 4
    assert second["lr_schedulers"][0]["last_epoch"] == 6
    # Adam's step counter continues rather than restarting.
    assert int(second["optimizer_states"][0]["state"][0]["step"]) == 6
    # The linear schedule over 6 steps would sit at lr·(1 - 4/6) = lr/3 after step 4 of a 6-step run; resuming
    # from a 4-step run keeps the 4-step schedule (lr reached 0), as the scheduler state is restored.
    assert second["lr_schedulers"][0]["_last_lr"][0] == pytest.approx(0.0)


def test_second_run_in_the_same_directory_is_refused(lora_run, train_cfg) -> None:
    from sdtune.run import RunDirError

    with pytest.raises(RunDirError, match="already holds a run"):
        train(train_cfg(*FAST, "logger=none", run_dir=lora_run.run_dir))


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "sdtune.train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_cli_prints_the_run_directory_last(tmp_path, cache_dir) -> None:
    run_dir = tmp_path / "cli-run"
    result = run_cli(
        *FAST,
        "trainer.max_steps=2",
        "trainer.log_every_n_steps=1",
        "logger=csv",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == str(run_dir)
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / "csv" / "metrics.csv").is_file()
    assert "train/loss" in (run_dir / "csv" / "metrics.csv").read_text()


def test_cli_bad_config_fails_fast_with_every_problem(tmp_path, cache_dir) -> None:
    result = run_cli(
        "+experiment=lora",
        "method.rank=-1",
        "sampling.scheduler=k_lms",
        "logger=none",
        f"hydra.run.dir={tmp_path / 'bad'}",
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert "method.rank" in result.stderr and "sampling.scheduler" in result.stderr
    assert "Traceback" not in result.stderr


def test_tensorboard_logger_writes_events_and_is_refused_when_not_installed(
    train_cfg, tmp_path, monkeypatch
) -> None:
    import importlib.util

    from sdtune.config import ConfigError, validate

    run = train(
        train_cfg(
            "+experiment=lora",
            "trainer.max_steps=2",
            "trainer.log_every_n_steps=1",
            "sampling.every_n_steps=0",
            "data.num_images=4",
            "logger=tensorboard",
        )
    )
    events = list((run.run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events and b"train/loss" in events[0].read_bytes()

    real_find_spec = importlib.util.find_spec
    missing = {"tensorboard", "tensorboardX"}
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in missing else real_find_spec(name, *a)
    )
    with pytest.raises(ConfigError, match=r"logger=tensorboard: .*pip install 'sdtune\[tensorboard\]'"):
        validate(train_cfg("+experiment=lora", "logger=tensorboard"))
