"""Judge an image-prompt run (`conditioning=image_prompt` on shapes-world edit pairs) on fresh pairs.

    python scripts/image_prompt_eval.py outputs/<run> --pairs 96 --guidance 4

Each fresh pair's source image is the image prompt and its instruction the prompt; the shapes-world judge
compares each sample with the pair's target: shape (which only the image names), colour and background (one of
them named by the instruction, the other only by the image). Prints one line of accuracies.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from PIL import Image

CONF = Path(__file__).resolve().parents[1] / "conf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--pairs", type=int, default=96)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=777, help="seed of the fresh pairs")
    args = parser.parse_args()

    from sdtune.data.joint import JointTransform
    from sdtune.data.pairs import write_shape_pairs
    from sdtune.judge import Judge
    from sdtune.sample import load_source
    from sdtune.sampling import generate, make_scheduler, to_pil

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "sample", [f"source={args.run}", "prompt=x", "out=unused.png", "image_prompt=unused.png"]
        )
    stack, conditioning, resolution = load_source(cfg)
    key = conditioning.components["image_prompt"].key
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        write_shape_pairs(root, args.pairs, resolution, args.seed)
        rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
        transform = JointTransform(resolution)
        sources = [transform(Image.open(root / r["source"]).convert("RGB"), augment=False)[0] for r in rows]
        targets = [Image.open(root / r["target"]).convert("RGB") for r in rows]
    images = []
    for start in range(0, len(rows), 16):
        chunk = rows[start : start + 16]
        batch = {
            "caption": [r["instruction"] for r in chunk],
            "negative_caption": [""] * len(chunk),
            key: torch.stack(sources[start : start + 16]),
        }
        scheduler = make_scheduler("dpmpp_2m", stack.scheduler_config)
        seeds = list(range(start, start + len(chunk)))
        out = generate(
            stack.unet, stack.vae, conditioning, batch, scheduler=scheduler, steps=args.steps,
            guidance=args.guidance, seed=start, height=resolution, width=resolution, noise_seeds=seeds,
        )  # fmt: skip
        images += to_pil(out)
    judge = Judge.load()
    drawn, truth = judge(images), judge(targets)
    accuracy = {
        attribute: sum(getattr(d, attribute) == getattr(t, attribute) for d, t in zip(drawn, truth))
        / len(rows)
        for attribute in ("shape", "colour", "background")
    }
    shapes = Counter(d.shape for d in drawn)
    print(f"{args.run}: {len(rows)} pairs, guidance {args.guidance}: "
          + ", ".join(f"{k} {v:.1%}" for k, v in accuracy.items()) + f"; drawn {dict(shapes)}")  # fmt: skip


if __name__ == "__main__":
    main()
