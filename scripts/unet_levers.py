"""What each speed lever does to the bare U-Net LoRA step on a GPU (one process, one model, variants in turn).

    python scripts/unet_levers.py [--arch sd15] [--batch 8] [--steps 15] [--variants base,cudnn,...]

The step is the benchmark's `unet_only` floor (SD1.5 architecture, random weights, bf16 frozen base, LoRA
rank 16 in fp32 on the attention projections, bf16 autocast, AdamW): latents and text states are random
tensors, so nothing but the U-Net forward + backward + optimizer is timed. Each variant prints one JSON line
as soon as it is measured (a lent GPU may be taken back at any moment).

A variant is a `+`-joined set of levers, applied from a clean state (e.g. `base`, `cudnn+nhwc+fused`):
  base      no lever (the benchmark's unet_only floor without the fused AdamW it now uses on a GPU)
  cudnn     torch.backends.cudnn.benchmark = True (cuDNN picks the fastest convolution per shape)
  nhwc      channels_last weights and inputs
  fused     AdamW(fused=True)
  bf16      LoRA weights in bf16 and no autocast (measures what autocast's casts cost; not a recipe)
  nocast    peft's cast of each LoRA input to the fp32 LoRA weights off (autocast casts it back to bf16
            anyway, so the result is the same; measured 3-6% slower on an H200, so sdtune keeps the cast)
  compile   torch.compile (default mode)
  autotune  torch.compile(mode="max-autotune-no-cudagraphs")
  graphs    torch.compile(mode="reduce-overhead"): CUDA graphs, one launch for the whole forward / backward
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdtune.benchmark_workloads import (  # noqa: E402
    ARCHITECTURES,
    HOPPER_BF16_DENSE_TFLOPS,
    LORA_TARGETS,
    TFLOP_PER_IMAGE_SD15_512,
)

LEVERS = ("base", "cudnn", "nhwc", "fused", "bf16", "nocast", "compile", "autotune", "graphs")
DEFAULT = "base,cudnn,nhwc,cudnn+nhwc,fused,base"


def build(arch: str, rank: int) -> Any:
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    torch.manual_seed(0)
    with torch.device("cuda"):
        unet = UNet2DConditionModel(**ARCHITECTURES[arch]["unet"])
    unet.requires_grad_(False)
    unet.to(dtype=torch.bfloat16)
    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
    )
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    unet.train()
    return unet


def measure(step: Any, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def profile(step: Any, name: str) -> None:
    """GPU kernel time per step against wall time (a low share means the CPU cannot feed the GPU)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        began = time.perf_counter()
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - began) / 3
    events = prof.key_averages()
    kernel = sum(e.self_device_time_total for e in events) / 3 / 1e6
    launches = sum(e.count for e in events if e.key.startswith(("cudaLaunchKernel", "cuLaunchKernel"))) / 3
    line = {"variant": name, "wall_ms": round(wall * 1e3, 1), "gpu_kernel_ms": round(kernel * 1e3, 1)}
    print(json.dumps({**line, "kernel_launches_per_step": launches}), flush=True)
    print(events.table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=60), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="sd15", choices=sorted(ARCHITECTURES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--variants", default=DEFAULT)
    parser.add_argument(
        "--profile", action="store_true", help="also profile 3 steps: GPU-busy share and the top CUDA ops"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (the CPU workloads are in scripts/benchmark.py)")
    wanted = args.variants.split(",")
    unknown = sorted({lever for v in wanted for lever in v.split("+")} - set(LEVERS))
    if unknown:
        parser.error(f"unknown levers {unknown}; choose from {', '.join(LEVERS)}")
    unet = build(args.arch, args.rank)
    cfg = ARCHITECTURES[args.arch]["unet"]
    size = cfg["sample_size"]
    latents = torch.randn(args.batch, 4, size, size, device="cuda", dtype=torch.bfloat16)
    hidden = torch.randn(args.batch, 77, cfg["cross_attention_dim"], device="cuda", dtype=torch.bfloat16)
    state: dict[str, Any] = {"model": unet, "autocast": True, "fused": False}

    def make_step() -> Any:
        params = [p for p in unet.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2, fused=state["fused"])
        model = state["model"]

        def step() -> None:
            x = latents.contiguous(memory_format=torch.channels_last) if state.get("nhwc") else latents
            noise = torch.randn_like(x)
            t = torch.randint(0, 1000, (x.shape[0],), device="cuda")
            ctx = torch.autocast("cuda", dtype=torch.bfloat16) if state["autocast"] else nullcontext()
            with ctx:
                pred = model(x + noise, t, hidden, return_dict=False)[0]
            F.mse_loss(pred.float(), noise.float()).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    def lora_dtype(dtype: torch.dtype) -> None:
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.to(dtype)

    for name in wanted:
        levers = set(name.split("+"))
        torch.backends.cudnn.benchmark = "cudnn" in levers
        nhwc = "nhwc" in levers
        unet.to(memory_format=torch.channels_last if nhwc else torch.contiguous_format)
        state.update(nhwc=nhwc, fused="fused" in levers, autocast="bf16" not in levers)
        lora_dtype(torch.bfloat16 if "bf16" in levers else torch.float32)
        for module in unet.modules():
            if hasattr(module, "cast_input_dtype_enabled"):
                module.cast_input_dtype_enabled = "nocast" not in levers
        torch._dynamo.reset()
        state["model"] = unet
        modes = {"compile": "default", "autotune": "max-autotune-no-cudagraphs", "graphs": "reduce-overhead"}
        mode = next((modes[lever] for lever in modes if lever in levers), None)
        if mode:
            state["model"] = torch.compile(unet, mode=mode)
        torch.cuda.reset_peak_memory_stats()
        began = time.perf_counter()
        seconds = measure(make_step(), args.steps, args.warmup)
        result = {
            "variant": name,
            "arch": args.arch,
            "batch": args.batch,
            "ms_per_step": round(seconds * 1000, 2),
            "images_per_s": round(args.batch / seconds, 1),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "wall_s_incl_warmup": round(time.perf_counter() - began, 1),
        }
        if args.arch == "sd15":
            result["mfu"] = round(
                args.batch / seconds * TFLOP_PER_IMAGE_SD15_512 / HOPPER_BF16_DENSE_TFLOPS, 3
            )
        print(json.dumps(result), flush=True)
        if args.profile:
            profile(make_step(), name)


if __name__ == "__main__":
    main()
