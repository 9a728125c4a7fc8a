"""Exact resume and interruption: N steps + resume + N steps is bitwise the 2N-step run, whatever stopped it.

One uninterrupted reference run; every other run here stops early (ends at step 2, Ctrl-C, SIGTERM, SIGKILL
mid-checkpoint-write) and is resumed to the same final step, and must land on the very same LoRA weights.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sdtune.callbacks.interrupt import TrainingInterrupted
from sdtune.train import train

from . import faults
from .conftest import compose_config

STEPS = 4  # 3 batches per epoch: the runs cross an epoch boundary
FAST = [
    "+experiment=lora",
    "data.num_images=6",
    "data.resolution=32",
    "data.batch_size=2",
    "method.dropout=0.1",  # more RNG to restore
    "sampling.prompts=[]",
    "logger=none",
    "callbacks.checkpoint.every_n_train_steps=2",
    "trainer.accelerator=cpu",
    f"trainer.max_steps={STEPS}",
]


def lora_weights(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.trainable_parameters().items()}


def assert_same_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[0]}"


def resume(run_dir: Path, tmp_path: Path, *extra: str):
    return train(compose_config("train", [*FAST, f"resume={run_dir}", *extra], tmp_path / "resumed"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir) -> dict[str, torch.Tensor]:
    run = train(compose_config("train", FAST, tmp_path_factory.mktemp("reference") / "run"))
    return lora_weights(run.module)


@pytest.fixture(scope="module")
def first_half(tmp_path_factory, cache_dir) -> Path:
    """A run of the same config that ended at step 2, mid-epoch."""
    run_dir = tmp_path_factory.mktemp("first-half") / "run"
    train(compose_config("train", [*FAST, "trainer.max_steps=2"], run_dir))
    return run_dir


def test_resume_is_exact(reference, first_half, tmp_path) -> None:
    checkpoint = torch.load(first_half / "checkpoints" / "last.ckpt", weights_only=True)  # no pickle needed
    assert checkpoint["global_step"] == 2
    assert "rng" in checkpoint["callbacks"]["ResumeState"]
    run = resume(first_half, tmp_path)
    assert run.trainer.global_step == STEPS
    assert_same_weights(lora_weights(run.module), reference)
    manifest = json.loads((run.run_dir / "manifest.json").read_text())
    assert manifest["resumed_from"] == str(first_half / "checkpoints" / "last.ckpt")
    assert manifest["dataset_changed_since_resume"] is None


def test_ctrl_c_stops_after_the_step_with_a_checkpoint(reference, tmp_path, monkeypatch) -> None:
    from sdtune.module import DiffusionModule

    step = DiffusionModule.training_step

    def interrupted(self, batch, batch_idx):
        if self.global_step == 1:
            signal.raise_signal(signal.SIGINT)  # arrives mid-step, as a real Ctrl-C would
        return step(self, batch, batch_idx)

    monkeypatch.setattr(DiffusionModule, "training_step", interrupted)
    run_dir = tmp_path / "interrupted"
    with pytest.raises(TrainingInterrupted) as info:
        train(compose_config("train", FAST, run_dir))
    assert info.value.signum == signal.SIGINT and info.value.step == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    monkeypatch.setattr(DiffusionModule, "training_step", step)
    assert_same_weights(lora_weights(resume(run_dir, tmp_path).module), reference)


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(reference, tmp_path) -> None:
    run_dir = tmp_path / "run"
    process = faults.start("slow", [*FAST, f"hydra.run.dir={run_dir}"], tmp_path)
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoints" / "step000002.ckpt").exists():
        assert process.poll() is None, faults.output(tmp_path)[1][-3000:]
        assert time.monotonic() < deadline, "the run never reached step 2"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=300) == 128 + signal.SIGTERM
    stderr = faults.output(tmp_path)[1]
    assert "interrupted by SIGTERM at step" in stderr and "Traceback" not in stderr
    assert "to continue this run: python -m sdtune.train +experiment=lora" in stderr
    assert f"resume={run_dir}" in stderr
    stopped_at = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 2 <= stopped_at < STEPS
    assert_same_weights(lora_weights(resume(run_dir, tmp_path).module), reference)


def test_killed_while_writing_a_checkpoint_keeps_the_previous_one(reference, tmp_path) -> None:
    run_dir = tmp_path / "run"
    # checkpoint files in order: step000001.ckpt, last.ckpt (step 1), step000002.ckpt ← killed half-way
    overrides = [*FAST, "callbacks.checkpoint.every_n_train_steps=1", f"hydra.run.dir={run_dir}"]
    process = faults.start("kill-in-checkpoint-3", overrides, tmp_path)
    assert process.wait(timeout=300) == -signal.SIGKILL, faults.output(tmp_path)[1][-3000:]
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("*.ckpt")) == ["last.ckpt", "step000001.ckpt"]
    (partial,) = checkpoints.glob(".step000002.ckpt.tmp-*")  # the torn write, never renamed into place
    with pytest.raises(RuntimeError):
        torch.load(partial, weights_only=True)
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 1
    assert_same_weights(lora_weights(resume(run_dir, tmp_path).module), reference)


def test_a_changed_dataset_is_reported_on_resume(first_half, tmp_path, cache_dir, caplog) -> None:
    from sdtune.data.shapes import dataset_path

    source = dataset_path(cache_dir, num_images=6, resolution=32, seed=0)
    changed = tmp_path / "shapes"
    shutil.copytree(source, changed)
    lines = (changed / "metadata.jsonl").read_text().splitlines()
    first, second = json.loads(lines[0]), json.loads(lines[1])
    (changed / first["file_name"]).unlink()
    second["text"] = "a different caption"
    (changed / "metadata.jsonl").write_text("\n".join([json.dumps(second), *lines[2:]]) + "\n")
    with caplog.at_level(logging.WARNING, logger="sdtune.resume"):
        run = resume(first_half, tmp_path, f"data.root={changed}", "trainer.max_steps=3")
    manifest = json.loads((run.run_dir / "manifest.json").read_text())
    change = manifest["dataset_changed_since_resume"]
    assert "the dataset changed since the checkpoint was written: 6 samples then" in change
    assert f"1 removed: {first['file_name']}" in change
    assert f"1 modified (image or caption): {second['file_name']}" in change
    assert change in caplog.text


def test_a_different_world_size_is_allowed_with_a_warning() -> None:
    from sdtune.callbacks.resume import ResumeState, capture_rng

    callback = ResumeState()
    callback.load_state_dict({"rng": capture_rng(), "world_size": 4})
    with pytest.warns(UserWarning, match="trained on 4 process"):
        callback.on_train_start(SimpleNamespace(world_size=2), None)
