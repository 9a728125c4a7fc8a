"""Re-train the shapes-world judge's shape classifier and write `sdtune/assets/judge.safetensors`.

    python scripts/train_judge.py [--steps 1500] [--vae <vae folder>] [--out sdtune/assets/judge.safetensors]

Half of each training batch goes through the pretrained tiny stack's autoencoder (or `--vae`), half is blurred
and noised.

Prints its accuracy on fresh renders (the bar is 98%); refuses to write weights below it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from sdtune.io import atomic_path
from sdtune.judge import JUDGE_WEIGHTS, Judge, accuracy_on_renders, train_shape_net

REQUIRED_ACCURACY = 0.98


def load_vae(folder: Path | None):  # -> AutoencoderKL
    from diffusers import AutoencoderKL

    if folder is None:
        import os

        from sdtune.models.tiny import ensure_tiny_pipeline

        cache = Path(os.environ.get("SDTUNE_CACHE_DIR", Path.home() / ".cache" / "sdtune"))
        folder = ensure_tiny_pipeline(cache, "pretrained") / "vae"
    return AutoencoderKL.from_pretrained(str(folder)).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=JUDGE_WEIGHTS)
    parser.add_argument(
        "--vae", type=Path, default=None, help="a diffusers VAE folder (default: the pretrained tiny stack's)"
    )
    args = parser.parse_args()
    net = train_shape_net(args.steps, seed=args.seed, vae=load_vae(args.vae))
    accuracy = accuracy_on_renders(Judge(net), count=1200, seed=args.seed + 1)
    print(json.dumps({"accuracy_on_fresh_renders": accuracy}))
    if accuracy["shape"] < REQUIRED_ACCURACY:
        raise SystemExit(f"shape accuracy {accuracy['shape']:.3f} < {REQUIRED_ACCURACY}; not written")
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    with atomic_path(args.out) as tmp:
        save_file(state, str(tmp))
    print(args.out)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
