"""The shapes-world judge, `sdtune.evaluate` and the evaluation callback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdtune.config import ConfigError
from sdtune.data.shapes import ShapeSpec, render
from sdtune.evaluation import Prompt, grid_prompts, score, total_variation
from sdtune.judge import NONE, Judge, Verdict, accuracy_on_renders

from .conftest import compose_config


@pytest.fixture(scope="module")
def judge() -> Judge:
    return Judge.load()


def test_judge_is_at_least_98_percent_right_on_fresh_renders(judge: Judge) -> None:
    accuracy = accuracy_on_renders(judge, count=600, seed=12345)
    assert accuracy["shape"] >= 0.98, accuracy
    assert accuracy["colour"] >= 0.99, accuracy
    assert accuracy["background"] == 1.0, accuracy


def test_judge_reads_each_field_of_a_known_render(judge: Judge) -> None:
    spec = ShapeSpec("star", "orange", "gray", cx=0.5, cy=0.5, size=0.3, rotation=10.0)
    verdict = judge([render(spec, 64)[0]])[0]
    assert (verdict.shape, verdict.colour, verdict.background) == ("star", "orange", "gray")


def test_judge_says_none_for_an_empty_image(judge: Judge) -> None:
    verdict = judge([Image.new("RGB", (64, 64), (255, 255, 255))])[0]
    assert (verdict.shape, verdict.colour, verdict.background) == (NONE, NONE, "white")


def test_grid_prompts_expand_only_the_named_fields() -> None:
    prompts = grid_prompts("a {colour} star", colours=["red", "blue"])
    assert prompts == [Prompt("a red star", colour="red"), Prompt("a blue star", colour="blue")]
    assert len(grid_prompts("a {colour} {shape} on a {background} background", ["circle", "square"])) == 36


def test_score_counts_each_field_against_what_was_prompted() -> None:
    red_circle = Prompt("a red circle", shape="circle", colour="red")
    blue = Prompt("a blue thing", colour="blue")
    rows = [
        (red_circle, 0, Verdict("white", "red", "circle", 100)),
        (red_circle, 1, Verdict("white", "red", "square", 100)),
        (blue, 0, Verdict("white", "green", "star", 100)),
        (blue, 1, Verdict("black", "blue", "star", 100)),
    ]
    result = score(rows)
    assert result["overall"]["n"] == 4
    assert result["overall"]["colour"] == pytest.approx(3 / 4)
    assert result["overall"]["shape"] == pytest.approx(1 / 2)  # only the two prompts that name a shape
    assert result["overall"]["background"] is None
    assert result["overall"]["all"] == pytest.approx(2 / 4)
    assert result["per_shape"]["circle"]["shape"] == pytest.approx(1 / 2)
    assert result["drawn"]["shape"] == {"circle": 0.25, "square": 0.25, "star": 0.5}


def test_total_variation_distance() -> None:
    assert total_variation({"red": 1.0}, {"red": 1.0}) == 0.0
    assert total_variation({"red": 1.0}, {"blue": 1.0}) == 1.0
    assert total_variation({"red": 0.5, "blue": 0.5}, {"red": 0.25, "green": 0.75}) == pytest.approx(0.75)


def evaluate_cfg(*overrides: str):
    return compose_config("evaluate", list(overrides))


def test_evaluate_writes_the_report_and_grid(tmp_path: Path, cache_dir: Path) -> None:
    from sdtune.evaluate import run

    out = tmp_path / "eval"
    cfg = evaluate_cfg(
        "source=tiny",
        "shapes=[circle, star]",
        "colours=[red]",
        "backgrounds=[white]",
        "per_prompt=2",
        "steps=2",
        "judge_renders=50",
        f"out={out}",
    )
    path = run(cfg)
    report = json.loads(path.read_text())
    assert report["schema"] == 1 and report["source"] == "tiny"
    assert report["overall"]["n"] == 4 and len(report["samples"]) == 4
    assert set(report["overall"]) == {"n", "shape", "colour", "background", "all"}
    assert set(report["per_shape"]) == {"circle", "star"}
    assert [s["seed"] for s in report["samples"]] == [0, 1, 0, 1]
    assert report["samples"][2]["expected"] == {"shape": "star", "colour": "red", "background": "white"}
    assert set(report["samples"][0]["judged"]) == {"background", "colour", "shape", "foreground_pixels"}
    assert report["judge"]["accuracy_on_fresh_renders"]["n"] == 50
    assert Image.open(out / "evaluation.png").size == (4 * 64, 64)
    with pytest.raises(ConfigError, match="already exists"):
        run(cfg)


def test_evaluate_refuses_bad_requests_before_loading(tmp_path: Path) -> None:
    from sdtune.evaluate import run

    with pytest.raises(ConfigError) as error:
        run(
            evaluate_cfg(
                "shapes=[circle, blob]",
                "scheduler=nope",
                "per_prompt=0",
                f"lora={tmp_path / 'missing.safetensors'}",
                f"source={tmp_path / 'no_run'}",
                f"out={tmp_path}",
            )
        )
    message = str(error.value)
    assert "'blob'" in message and "scheduler" in message and "per_prompt" in message
    assert message.count("'blob'") == 1, "one line for the unknown shape, not one per prompt"
    assert "shape 'blob' (18 prompts, e.g. 'a red blob on a black background')" in message
    assert "lora: file" in message and "source:" in message

    with pytest.raises(
        ConfigError, match=r"condition_guidance: unknown condition\(s\) \['map'\]; this model has \['text'\]"
    ):
        run(evaluate_cfg("source=tiny", "condition_guidance={map: 2.0}", f"out={tmp_path / 'eval'}"))

    unfinished = tmp_path / "stopped_run"
    (unfinished / "checkpoints").mkdir(parents=True)  # what a run killed before its export leaves
    with pytest.raises(ConfigError, match="neither a finished sdtune run"):
        run(evaluate_cfg(f"source={unfinished}", f"out={tmp_path / 'eval'}"))


def test_train_config_refuses_unknown_shape_names(train_cfg) -> None:
    from sdtune.config import validate

    cfg = train_cfg(
        "+experiment=lora",
        "data.shapes=[circle, blob]",
        "evaluation.every_n_steps=5",
        "evaluation.colours=[mauve]",
    )
    with pytest.raises(ConfigError) as error:
        validate(cfg)
    assert "data.shapes" in str(error.value) and "evaluation.colours" in str(error.value)


def test_evaluation_callback_judges_during_training(train_cfg, tmp_path: Path) -> None:
    from sdtune.train import train

    run_dir = tmp_path / "run"
    cfg = train_cfg(
        "+experiment=lora",
        "trainer.max_steps=2",
        "data.num_images=16",
        "data.batch_size=4",
        "sampling.every_n_steps=0",
        "sampling.prompts=[]",
        "evaluation.every_n_steps=2",
        "evaluation.shapes=[circle]",
        "evaluation.colours=[red, blue]",
        "evaluation.backgrounds=[white]",
        "evaluation.steps=2",
        "logger=csv",
        "export.formats=[diffusers]",
        run_dir=run_dir,
    )
    train(cfg)
    report = json.loads((run_dir / "eval" / "step_000002.json").read_text())
    assert report["step"] == 2 and report["overall"]["n"] == 2
    assert (run_dir / "eval" / "step_000002.png").is_file()
    metrics = (next((run_dir / "csv").rglob("metrics.csv"))).read_text()
    assert "eval/colour" in metrics.splitlines()[0]


def test_evaluation_is_reproducible(tmp_path: Path, cache_dir: Path) -> None:
    from sdtune.evaluate import run

    common = ["source=tiny", "shapes=[square]", "colours=[green]", "backgrounds=[black]", "steps=2"]
    first = json.loads(run(evaluate_cfg(*common, f"out={tmp_path / 'a'}", "judge_renders=0")).read_text())
    second = json.loads(run(evaluate_cfg(*common, f"out={tmp_path / 'b'}", "judge_renders=0")).read_text())
    assert first["samples"] == second["samples"]
    a = np.asarray(Image.open(tmp_path / "a" / "evaluation.png"))
    assert np.array_equal(a, np.asarray(Image.open(tmp_path / "b" / "evaluation.png")))


def test_evaluate_applies_and_records_a_condition_guidance(tmp_path: Path, cache_dir: Path) -> None:
    from sdtune.evaluate import run

    common = ["source=tiny", "shapes=[square]", "colours=[green]", "backgrounds=[black]", "steps=2"]
    common += ["judge_renders=0"]
    plain = run(evaluate_cfg(*common, f"out={tmp_path / 'a'}"))
    own = json.loads(
        run(evaluate_cfg(*common, "condition_guidance={text: 1.0}", f"out={tmp_path / 'b'}")).read_text()
    )
    assert own["settings"]["condition_guidance"] == {"text": 1.0}
    a = np.asarray(Image.open(plain.with_suffix(".png")))
    assert not np.array_equal(a, np.asarray(Image.open(tmp_path / "b" / "evaluation.png")))


def test_evaluate_applies_and_records_a_guidance_rescale(tmp_path: Path, cache_dir: Path) -> None:
    from sdtune.evaluate import run

    common = ["source=tiny", "shapes=[square]", "colours=[green]", "backgrounds=[white]", "steps=3"]
    common += ["judge_renders=0", "guidance=7"]
    plain = json.loads(run(evaluate_cfg(*common, f"out={tmp_path / 'a'}")).read_text())
    rescaled = json.loads(
        run(evaluate_cfg(*common, "guidance_rescale=0.7", f"out={tmp_path / 'b'}")).read_text()
    )
    assert plain["settings"]["guidance_rescale"] == 0.0 and rescaled["settings"]["guidance_rescale"] == 0.7
    a = np.asarray(Image.open(tmp_path / "a" / "evaluation.png"))
    assert not np.array_equal(a, np.asarray(Image.open(tmp_path / "b" / "evaluation.png")))


def test_map_iou_of_a_render_with_its_own_map_is_high_and_of_a_moved_map_low() -> None:
    from sdtune.evaluation import foreground_iou

    spec = ShapeSpec("square", "blue", "white", cx=0.3, cy=0.3, size=0.2, rotation=0.0)
    moved = ShapeSpec("square", "blue", "white", cx=0.7, cy=0.7, size=0.2, rotation=0.0)
    image, label_map = render(spec, 64)
    assert foreground_iou(image, label_map) >= 0.9
    assert foreground_iou(image, render(moved, 64)[1]) == 0.0
