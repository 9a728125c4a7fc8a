"""Copy a pretrained tiny stack (a +experiment=pretrain run's pipeline/) into the package, in fp16.

    python scripts/ship_tiny_weights.py outputs/<pretrain run>/pipeline

Writes `sdtune/models/assets/tiny_pretrained/{unet,vae,text_encoder}.safetensors` and `vae.json` (the latent
scaling factor). The weights must fit the embedded architecture exactly (checked by loading them into it).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from sdtune.io import atomic_path, atomic_write_text
from sdtune.models.tiny import COMPONENTS, PRETRAINED_DIR, build_tiny_pipeline

FILES = {
    "unet": "diffusion_pytorch_model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pipeline", type=Path)
    parser.add_argument("--out", type=Path, default=PRETRAINED_DIR)
    args = parser.parse_args()
    reference = build_tiny_pipeline()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in COMPONENTS:
        state = load_file(str(args.pipeline / name / FILES[name]))
        getattr(reference, name).load_state_dict(state, strict=True)  # refuses another architecture
        half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
        with atomic_path(args.out / f"{name}.safetensors") as tmp:
            save_file(half, str(tmp))
    vae_config = json.loads((args.pipeline / "vae" / "config.json").read_text())
    atomic_write_text(
        args.out / "vae.json", json.dumps({"scaling_factor": vae_config["scaling_factor"]}) + "\n"
    )
    print(args.out)


if __name__ == "__main__":
    main()
