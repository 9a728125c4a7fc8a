"""The quality benchmarks of the pretrained tiny base (README: "Does it learn?"), end to end on CPU.

    python scripts/quality.py --out quality/ [--only base,lora,dreambooth] [--steps-scale 1.0]

Each benchmark trains with `python -m sdtune.train` and scores with `python -m sdtune.evaluate`, exactly the
commands a user would run (printed as they run), then writes `<out>/summary.json` and a Markdown table:

- base: the pretrained base on its pretraining classes (DPM++ 2M, 20 steps, guidance 4), 3 seeds per prompt.
- lora: a LoRA teaches the held-out star from images in two colours (+experiment=lora_new_shape); the star is
  judged before and after, in all six colours (the four untrained ones measure compositional generalisation).
- semantic: +experiment=semantic with method=full (the widened conv_in and every U-Net weight) on the
  pretrained base; the mean IoU between each conditioning map and the generated foreground.
- dreambooth: "a sks hexagon" (one yellow hexagon on black), with and without prior preservation; the drift of
  the class prompt "a hexagon" is the total-variation distance of its colour distribution from the base's.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sdtune.data.shapes import COLOURS
from sdtune.evaluation import total_variation

TRAINED_COLOURS = ("red", "blue")
THREADS = 0  # --threads: torch threads of each training run (0 = sdtune's default, the physical cores)
# Yellow: a colour the base never gives "a hexagon" when no colour is named, so drift toward it is visible.
# Black: the instance must be something the base can draw; it gets hexagons right on black (18/18) far more
# often than on gray (13/18, which capped the instance at ~60-80%).
INSTANCE = {"shape": "hexagon", "colour": "yellow", "background": "black"}
LORA_STEPS = 1000
# A LoRA that can change shapes as well as colours (attention, projections and feed-forward), and the text
# encoder, which has to learn the identifier: the recipe of +experiment=lora_new_shape.
DREAMBOOTH_LORA = [
    "method.rank=8",
    "method.alpha=8",
    "method.lr=1e-3",
    "method.train_text_encoder=true",
    "method.target_modules=[to_q,to_k,to_v,to_out.0,proj_in,proj_out,ff.net.0.proj,ff.net.2]",
]


def run(args: list[str]) -> str:
    """Run a `python -m sdtune.*` command; its last stdout line (the run dir or the report path)."""
    command = [sys.executable, "-m", *args]
    print("$", shlex.join(command[1:]), flush=True)
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
    if result.returncode:
        sys.stderr.write(result.stderr[-4000:])
        raise SystemExit(f"failed: {shlex.join(command)}")
    print(f"  ({time.monotonic() - started:.0f} s) {result.stderr.strip().splitlines()[-1]}", flush=True)
    return result.stdout.strip().splitlines()[-1]


def evaluate(source: str, out: Path, name: str, *overrides: str) -> dict[str, Any]:
    path = run(
        ["sdtune.evaluate", f"source={source}", f"out={out}", f"name={name}", "overwrite=true", *overrides]
    )
    return json.loads(Path(path).read_text())


def train(out: Path, name: str, *overrides: str) -> tuple[str, float]:
    started = time.monotonic()
    threads = [f"runtime.threads={THREADS}"] if THREADS else []
    run_dir = run(["sdtune.train", f"paths.output_dir={out / name}", "logger=csv", *threads, *overrides])
    return run_dir, time.monotonic() - started


def base(out: Path) -> dict[str, Any]:
    report = evaluate("tiny", out / "eval", "base")
    return {"overall": report["overall"], "per_shape": report["per_shape"], "judge": report.get("judge")}


def lora(out: Path, scale: float) -> dict[str, Any]:
    star = ["shapes=[star]", "per_prompt=2"]
    before = evaluate("tiny", out / "eval", "lora_before", *star)
    run_dir, seconds = train(
        out, "lora_new_shape", "+experiment=lora_new_shape", f"trainer.max_steps={int(LORA_STEPS * scale)}"
    )
    after = evaluate(run_dir, out / "eval", "lora_after", *star)
    untrained = [c for c in COLOURS if c not in TRAINED_COLOURS]
    unseen = [s for s in after["samples"] if s["expected"]["colour"] in untrained]
    return {
        "train_seconds": round(seconds),
        "star_shape_accuracy_before": before["overall"]["shape"],
        "star_shape_accuracy_after": after["overall"]["shape"],
        "colour_accuracy_after": after["overall"]["colour"],
        "colour_accuracy_untrained_colours": sum(
            s["judged"]["colour"] == s["expected"]["colour"] for s in unseen
        )
        / len(unseen),
        "shape_accuracy_untrained_colours": sum(s["judged"]["shape"] == "star" for s in unseen) / len(unseen),
    }


def dreambooth(out: Path, scale: float) -> dict[str, Any]:
    instance_prompt, class_prompt = "a sks hexagon", "a hexagon"
    class_set = ["prompts=[{text: 'a hexagon', shape: hexagon}]", "per_prompt=48"]
    instance_set = [
        f"prompts=[{{text: '{instance_prompt}', shape: hexagon, colour: {INSTANCE['colour']}, "
        f"background: {INSTANCE['background']}}}]",
        "per_prompt=24",
    ]
    base_class = evaluate("tiny", out / "eval", "db_base_class", *class_set)
    common = [
        "+experiment=dreambooth",
        "model.weights=pretrained",
        f"data.instance_prompt='{instance_prompt}'",
        *(f"data.synthetic.{k}={v}" for k, v in INSTANCE.items()),
        *DREAMBOOTH_LORA,
        f"sampling.prompts=['{instance_prompt}','{class_prompt}']",
        f"trainer.max_steps={int(400 * scale)}",
    ]
    result: dict[str, Any] = {"base_class_colours": base_class["drawn"]["colour"]}
    for label, prior in (
        ("without_prior", ["data.class_prompt=null"]),
        # Twice the paper's prior weight: with the identifier learnt by the text encoder too, weight 1 let
        # "a hexagon" drift 0.40 (vs 0.96 without a prior; instance on gray); weight 2 held it to 0.23.
        ("with_prior", [f"data.class_prompt='{class_prompt}'", "method.prior_loss_weight=2.0"]),
    ):
        run_dir, seconds = train(out, f"dreambooth_{label}", *common, *prior)
        drift = evaluate(run_dir, out / "eval", f"db_{label}_class", *class_set)
        instance = evaluate(run_dir, out / "eval", f"db_{label}_instance", *instance_set)
        result[label] = {
            "train_seconds": round(seconds),
            "class_colours": drift["drawn"]["colour"],
            "class_colour_tv_from_base": total_variation(
                drift["drawn"]["colour"], base_class["drawn"]["colour"]
            ),
            "instance_reproduced": instance["overall"]["all"],
        }
    return result


def semantic(out: Path, scale: float) -> dict[str, Any]:
    run_dir, seconds = train(
        out,
        "semantic",
        "+experiment=semantic",
        "model.weights=pretrained",
        "method=full",  # every U-Net weight learns to read the new map channels, not a LoRA beside them
        "method.lr=3e-4",
        "data.batch_size=16",
        "export.formats=[pipeline]",
        f"trainer.max_steps={int(3000 * scale)}",
    )
    report = evaluate(run_dir, out / "eval", "semantic", "per_prompt=1")
    return {
        "train_seconds": round(seconds),
        "map_iou": report["map_iou"]["mean"],
        "overall": report["overall"],
    }


BENCHMARKS = {
    "base": lambda out, scale: base(out),
    "lora": lora,
    "dreambooth": dreambooth,
    "semantic": semantic,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("quality"))
    parser.add_argument("--only", default=",".join(BENCHMARKS))
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every training length")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0 = physical cores)")
    args = parser.parse_args()
    global THREADS
    THREADS = args.threads
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the evaluations
    args.out.mkdir(parents=True, exist_ok=True)
    summary_path = args.out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    for name in args.only.split(","):
        summary[name] = BENCHMARKS[name](args.out, args.steps_scale)
        summary_path.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
