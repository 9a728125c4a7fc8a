"""NaN losses, untrusted pickle files, secrets, a full disk: each stops or goes on cleanly, with a reason."""

from __future__ import annotations

import errno
import math
import os
import uuid
from pathlib import Path

import pytest
import torch

from sdtune.checkpoint import (
    AtomicCheckpointIO,
    CheckpointWriteError,
    UntrustedFileError,
    load_pickle_safely,
    tensors_only_copy,
)
from sdtune.config import ConfigError, validate
from sdtune.losses import NonFiniteGuard, NonFiniteLossError
from sdtune.redact import REDACTED, redact
from sdtune.train import train

from . import faults

FAST = [
    "+experiment=lora",
    "data.num_images=6",
    "data.resolution=32",
    "data.batch_size=2",
    "sampling.prompts=[]",
    "logger=none",
    "trainer.accelerator=cpu",
]


# ---- non-finite loss --------------------------------------------------------------------------------------


def test_nan_steps_are_skipped_counted_and_stop_the_run(train_cfg, monkeypatch) -> None:
    from sdtune.module import DiffusionModule

    per_sample_loss = DiffusionModule.per_sample_loss
    modules = []

    def poisoned(self, latents, conditions, unconditional):
        modules.append(self)
        losses = per_sample_loss(self, latents, conditions, unconditional)
        nan = self.global_step == 0 or self.global_step >= 2  # one alone, then a streak
        return losses * math.nan if nan else losses

    monkeypatch.setattr(DiffusionModule, "per_sample_loss", poisoned)
    cfg = train_cfg(
        *FAST,
        "trainer.max_steps=10",
        "loss.max_nonfinite_steps=2",
        "callbacks.checkpoint.every_n_train_steps=2",
    )
    with pytest.raises(NonFiniteLossError) as info:
        train(cfg)
    message = str(info.value)
    assert "NaN/inf for 2 consecutive steps (up to step 3; 3 in total" in message
    for hint in ("learning rate", "fp16", "bad data", "resume="):
        assert hint in message
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    assert f"last good checkpoint: {last}" in message

    module = modules[-1]
    assert module.nonfinite.total == 3
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] == 2 and checkpoint["sdtune"]["nonfinite_steps"] == 1
    trained = module.trainable_parameters()
    for name, value in checkpoint["state_dict"].items():
        assert torch.isfinite(value).all()
        assert torch.equal(value, trained[name])  # skipped steps left the weights alone


def test_weights_that_became_non_finite_are_never_checkpointed() -> None:
    guard = NonFiniteGuard(limit=10)
    guard.check_weights({"a": torch.ones(2)}, step=5)
    with pytest.raises(NonFiniteLossError, match=r"became NaN/inf by step 7 \(b, 1 tensor"):
        guard.check_weights({"a": torch.ones(2), "b": torch.tensor([1.0, math.inf])}, step=7)


def test_max_nonfinite_steps_is_validated(train_cfg) -> None:
    with pytest.raises(ConfigError, match="loss.max_nonfinite_steps: must be an integer >= 1"):
        validate(train_cfg("loss.max_nonfinite_steps=0"))


# ---- untrusted pickle files -------------------------------------------------------------------------------


class Payload:
    """What a malicious checkpoint carries: unpickling it runs code (here: creates a marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def evil_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "code-ran"
    path = tmp_path / "downloaded.ckpt"
    torch.save({"state_dict": {"w": torch.arange(3.0)}, "extra": Payload(marker)}, path)
    return path, marker


def test_pickle_checkpoints_are_refused_without_the_opt_in(evil_checkpoint, train_cfg) -> None:
    path, marker = evil_checkpoint
    with pytest.raises(ConfigError) as info:
        validate(train_cfg(f"model.pretrained={path}"))
    assert "model.pretrained:" in str(info.value) and "model.allow_pickle=true" in str(info.value)
    assert "it references " in str(info.value)
    with pytest.raises(UntrustedFileError, match="resume: .* could run arbitrary code"):
        train(train_cfg(*FAST, f"resume={path}"))
    assert not marker.exists(), "refusing must not run the file's code"


def test_the_opt_in_loads_a_trusted_pickle(evil_checkpoint, tmp_path) -> None:
    from safetensors.torch import load_file

    path, marker = evil_checkpoint
    loaded = load_pickle_safely(path, key="resume", allow_pickle=True)
    assert marker.exists() and torch.equal(loaded["state_dict"]["w"], torch.arange(3.0))
    copy = tensors_only_copy(path, tmp_path / "cache")  # what diffusers' weights-only loader gets
    assert copy.suffix == ".safetensors" and torch.equal(load_file(copy)["w"], torch.arange(3.0))
    assert tensors_only_copy(path, tmp_path / "cache") == copy  # converted once


def test_tensor_only_pickles_need_no_opt_in(tmp_path, train_cfg) -> None:
    path = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "global_step": 3}, path)
    assert load_pickle_safely(path, key="resume", allow_pickle=False)["global_step"] == 3


# ---- a full disk ------------------------------------------------------------------------------------------


def test_a_full_disk_is_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch) -> None:
    import sdtune.checkpoint as checkpoint

    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, target)

    class FullDisk:
        def __init__(self, f) -> None:
            self.f, self.written = f, 0

        def write(self, data) -> int:
            self.written += len(data)
            if self.written > 1000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.f.close()

    monkeypatch.setattr(checkpoint, "open", lambda *a, **k: FullDisk(open(*a, **k)), raising=False)
    with pytest.raises(CheckpointWriteError, match="No space left on device.*disk is full.*untouched"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(10_000)}, target)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind
    assert io.load_checkpoint(target)["step"] == 1


# ---- secrets ----------------------------------------------------------------------------------------------


def test_redact_removes_secret_values_and_secret_keys(monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_0123456789abcdef")
    config = {"a": ["x hf_0123456789abcdef y"], "api_key": "k", "n": 3, "tokenizer": "clip"}
    assert redact(config) == {"a": [f"x {REDACTED} y"], "api_key": REDACTED, "n": 3, "tokenizer": "clip"}


def test_a_run_with_secrets_in_the_environment_leaves_no_trace_of_them(tmp_path, cache_dir) -> None:
    wandb_key = "sdtunetest" + uuid.uuid4().hex[:30]  # 40 characters, like a real W&B key
    hub_token = "hf_" + uuid.uuid4().hex
    run_dir = tmp_path / "run"
    overrides = [
        *FAST,
        "trainer.max_steps=1",
        "logger=wandb",
        "sampling.negative_prompt=${oc.env:HF_TOKEN}",  # a config value that resolves a secret
        f"hydra.run.dir={run_dir}",
    ]
    secrets = {"WANDB_API_KEY": wandb_key, "HF_TOKEN": hub_token, "WANDB_MODE": "offline"}
    process = faults.start("none", overrides, tmp_path, **secrets)
    assert process.wait(timeout=600) == 0, faults.output(tmp_path)[1][-3000:]
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb")), "W&B wrote nothing"
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) > 10
    for path in written:
        data = path.read_bytes()
        for secret in (wandb_key, hub_token):
            assert secret.encode() not in data, f"{secret[:6]}… found in {path.relative_to(tmp_path)}"
