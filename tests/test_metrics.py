"""CLIP score and FID (`sdtune.evaluate metrics.*`) with a tiny CLIP model built and saved here: the values
are torchmetrics' and agree with a hand computation; missing weights or references are named up front."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sdtune.config import ConfigError
from sdtune.data.shapes import ShapeSpec, caption, render, sample_spec
from sdtune.metrics import ClipImageFeatures, clip_score, fid, load_clip
from sdtune.models.tiny import TOKENIZER_DIR

from .conftest import compose_config


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = tmp_path_factory.mktemp("clip")
    tokenizer = CLIPTokenizer(str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"))
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={**small, "vocab_size": len(tokenizer), "max_position_embeddings": 77},
        vision_config={**small, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def renders(count: int, seed: int, **only: list[str]) -> tuple[list, list[str]]:
    rng = np.random.default_rng(seed)
    specs: list[ShapeSpec] = [sample_spec(rng, **only) for _ in range(count)]
    return [render(spec, 64)[0] for spec in specs], [caption(spec) for spec in specs]


def test_clip_score_is_torchmetrics_and_matches_a_hand_computation(clip_dir: Path) -> None:
    model, processor = clip = load_clip(str(clip_dir))
    images, texts = renders(6, seed=0)
    expected = []
    with torch.no_grad():
        for image, text in zip(images, texts):
            inputs = processor(text=[text], images=[image], return_tensors="pt", padding=True)
            out = model(**inputs)
            cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds).item()
            expected.append(max(100 * cos, 0.0))
    assert clip_score(images, texts, clip) == pytest.approx(float(np.mean(expected)), rel=1e-4, abs=1e-4)


def test_fid_is_zero_for_one_set_and_grows_with_a_different_one(clip_dir: Path) -> None:
    features = ClipImageFeatures(load_clip(str(clip_dir)))
    red, _ = renders(12, seed=1, shapes=["circle"], colours=["red"], backgrounds=["white"])
    blue, _ = renders(12, seed=2, shapes=["square"], colours=["blue"], backgrounds=["black"])
    same = fid(red, red, features)
    different = fid(red, blue, features)
    assert abs(same) < 1e-3
    assert different > 100 * max(abs(same), 1e-6)


def test_evaluate_reports_clip_score_and_fid(clip_dir: Path, tmp_path: Path) -> None:
    from sdtune.evaluate import run

    reference = tmp_path / "reference"
    reference.mkdir()
    for i, image in enumerate(renders(6, seed=3)[0]):
        image.save(reference / f"{i}.png")
    cfg = compose_config(
        "evaluate",
        [
            "source=tiny",
            "shapes=[circle]",
            "colours=[red, blue]",
            "backgrounds=[white]",
            "per_prompt=2",
            "steps=3",
            "judge_renders=0",
            f"metrics.clip_model={clip_dir}",
            f"metrics.fid_reference={reference}",
            f"out={tmp_path / 'eval'}",
        ],
    )
    report = json.loads(run(cfg).read_text())
    metrics = report["metrics"]
    assert metrics["clip_score"]["n"] == 4 and np.isfinite(metrics["clip_score"]["mean"])
    assert metrics["fid"]["features"] == "clip" and np.isfinite(metrics["fid"]["value"])
    assert (metrics["fid"]["n_generated"], metrics["fid"]["n_reference"]) == (4, 6)


def test_missing_weights_and_references_are_named_before_loading(tmp_path: Path) -> None:
    from sdtune.evaluate import run

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError) as error:
        run(
            compose_config(
                "evaluate",
                [
                    "source=tiny",
                    "metrics.clip_model=openai/clip-vit-large-patch14",  # not in this machine's hub cache
                    f"metrics.fid_reference={empty}",
                    "metrics.fid_features=inception",
                    f"out={tmp_path / 'eval'}",
                ],
            )
        )
    message = str(error.value)
    assert (
        "metrics.clip_model: 'openai/clip-vit-large-patch14'" in message
        and "nothing is downloaded" in message
    )
    assert f"metrics.fid_reference: {empty} holds 0 image(s)" in message
    assert "metrics.fid_inception_weights" in message
    with pytest.raises(ConfigError, match="fid_features=clip compares CLIP image embeddings"):
        run(compose_config("evaluate", ["source=tiny", f"metrics.fid_reference={empty}", f"out={tmp_path}"]))
    broken = tmp_path / "broken"
    broken.mkdir()
    for i, image in enumerate(renders(2, seed=4)[0]):
        image.save(broken / f"{i}.png")
    (broken / "2.png").write_bytes(b"not a png")
    with pytest.raises(ConfigError, match=r"1 unreadable image\(s\), remove or replace them: .*2\.png"):
        run(compose_config("evaluate", ["source=tiny", f"metrics.fid_reference={broken}", f"out={tmp_path}"]))
