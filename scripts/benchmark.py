"""Benchmark sdtune's training step against a plain diffusers + peft loop; prints JSON to stdout.

    python scripts/benchmark.py --workload tiny-cpu
    python scripts/benchmark.py --workload mid-cpu --steps 10 --warmup 3 --repeats 2 --cache
    python scripts/benchmark.py --workload sd15-lora-512 --cache [--compile]     # needs a CUDA GPU

Workloads: tiny-cpu (the embedded stack, 64 px, batch 8), mid-cpu (SD architecture, 35 M-parameter U-Net,
128 px, batch 4), sd15-lora-512 (SD1.5, 512 px, batch 8, rank 16, bf16), sdxl-lora-1024 (not supported yet).
See `sdtune/benchmark.py` for what each side measures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's sdtune

from sdtune.benchmark import Options, run_benchmark  # noqa: E402
from sdtune.benchmark_workloads import WORKLOADS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workload", required=True, choices=sorted(WORKLOADS))
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side, interleaved; medians kept")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: physical cores)"
    )
    parser.add_argument("--cache", action="store_true", help="sdtune trains from the latent/text cache")
    parser.add_argument("--compile", action="store_true", help="torch.compile the U-Net (sdtune and plain)")
    parser.add_argument(
        "--compile-mode",
        default="default",
        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
    )
    parser.add_argument("--channels-last", action="store_true", help="NHWC U-Net and VAE (every side)")
    parser.add_argument(
        "--sides", default="sdtune,plain,unet_only", help="comma-separated subset of sdtune,plain,unet_only"
    )
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        help="extra sdtune config override, e.g. runtime.compile=true",
    )
    parser.add_argument(
        "--cache-dir", default=None, help="models, data, latents (default: $SDTUNE_CACHE_DIR)"
    )
    args = parser.parse_args()
    options = Options(
        workload=args.workload,
        steps=args.steps,
        warmup=args.warmup,
        repeats=args.repeats,
        threads=args.threads,
        cache=args.cache,
        compile=args.compile,
        compile_mode=args.compile_mode,
        channels_last=args.channels_last,
        sides=args.sides.split(","),
        cache_dir=args.cache_dir,
        overrides=args.override,
    )
    print(json.dumps(run_benchmark(options), indent=2))


if __name__ == "__main__":
    main()
