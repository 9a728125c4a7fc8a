"""The shipped pretrained tiny base: it is what `model=tiny` loads, it draws what it is asked, and a short
LoRA teaches it a shape class it never saw (loose versions of the README's quality benchmarks, CI-sized)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from sdtune.models import tiny

from .conftest import compose_config

SMALL_SET = ["colours=[red, blue, yellow]", "backgrounds=[white, black]", "per_prompt=2", "steps=12"]


def evaluate(source: str, out: Path, *overrides: str) -> dict:
    from sdtune.evaluate import run

    cfg = compose_config("evaluate", [f"source={source}", f"out={out}", "judge_renders=0", *overrides])
    return json.loads(run(cfg).read_text())


def test_model_tiny_loads_the_shipped_weights(train_cfg, cache_dir: Path) -> None:
    from sdtune.models import load_stack

    cfg = train_cfg("+experiment=lora")
    assert cfg.model.weights == "pretrained"
    stack = load_stack(cfg.model, cache_dir)
    shipped = load_file(tiny.PRETRAINED_DIR / "unet.safetensors")
    state = stack.unet.state_dict()
    assert all(torch.equal(state[k], v.float()) for k, v in shipped.items())
    scale = json.loads((tiny.PRETRAINED_DIR / "vae.json").read_text())["scaling_factor"]
    assert stack.vae.config.scaling_factor == scale


def test_pretrained_base_draws_the_prompted_shape_and_colour(tmp_path: Path, cache_dir: Path) -> None:
    report = evaluate("tiny", tmp_path, "shapes=[circle, square]", *SMALL_SET)
    assert report["overall"]["n"] == 24
    # Chance is 1/6 for colour and shape; the README's benchmark measures the real figures (100%, 94%).
    assert report["overall"]["colour"] >= 0.8
    assert report["overall"]["shape"] >= 0.75
    assert report["overall"]["background"] >= 0.8


def test_short_lora_raises_new_class_accuracy_above_the_base(train_cfg, tmp_path: Path) -> None:
    from sdtune.train import train

    star = ["shapes=[star]", *SMALL_SET]
    before = evaluate("tiny", tmp_path / "before", *star)
    run_dir = tmp_path / "run"
    train(
        train_cfg(
            "+experiment=lora_new_shape",
            "trainer.max_steps=120",
            "data.num_images=96",
            "sampling.every_n_steps=0",
            "sampling.prompts=[]",
            "logger=none",
            run_dir=run_dir,
        )
    )
    after = evaluate(str(run_dir), tmp_path / "after", *star)
    assert after["overall"]["shape"] > before["overall"]["shape"], (before["overall"], after["overall"])
