"""Benchmark workloads: sdtune's real training step against a plain hand-written diffusers + peft loop.

Three sides run the same model, data, batch, resolution, LoRA rank and thread count, each in a fresh process
(so peak memory is its own):
- `sdtune`: `sdtune.train.train` on a composed config — DiffusionModule through a Lightning Trainer, with the
  latent/text cache when asked;
- `plain`: the loop of diffusers' `train_text_to_image_lora.py` written out: VAE encode, CLIP encode, U-Net
  forward/backward, gradient clipping, AdamW;
- `unet_only`: U-Net forward + backward + clipping + AdamW (fused on a GPU, as sdtune's default there) on
  latents and text states computed once: the floor that a cached step can reach.
Step times are taken at the end of every step (after a device sync on GPU); the steady state is the median
after the warm-up steps. Each step's process CPU time is recorded too: on a machine shared with other work,
wall time measures the contention as much as the code, while CPU time (with one thread and no data-loader
workers) is the work the step itself did. `scripts/benchmark.py` is the command line.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from sdtune.benchmark_workloads import (
    HOPPER_BF16_DENSE_TFLOPS,
    LORA_TARGETS,
    TFLOP_PER_IMAGE_SD15_512,
    WORKLOADS,
    Workload,
    ensure_data,
    ensure_model,
)

REPO = Path(__file__).resolve().parents[1]
RESULT_MARK = "SDTUNE_BENCHMARK_RESULT "


@dataclass
class Spec:
    """One side's run, passed to its child process as JSON."""

    workload: str
    side: str  # sdtune | plain | unet_only
    steps: int
    warmup: int
    threads: int
    cache: bool = False
    compile: bool = False
    compile_mode: str = "default"
    channels_last: bool = False
    cache_dir: str = ""
    model_dir: str = ""
    data_dir: str = ""
    overrides: list[str] = field(default_factory=list)  # extra sdtune config overrides

    @property
    def total_steps(self) -> int:
        return self.steps + self.warmup


# ---- measuring --------------------------------------------------------------------------------------------


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


Stamp = tuple[float, float]  # (wall clock, process CPU time)


def stamp() -> Stamp:
    _sync()
    return time.perf_counter(), time.process_time()


class StepTimer(pl.Callback):
    """Stamps at the start of training and the end of every training step."""

    def __init__(self) -> None:
        self.stamps: list[Stamp] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.stamps.append(stamp())

    def on_train_batch_end(self, *args: Any) -> None:
        self.stamps.append(stamp())


def summarise(stamps: list[Stamp], warmup: int, batch_size: int) -> dict[str, Any]:
    """Steady-state figures from step-end stamps (the first is the start of step 1)."""
    wall = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])][warmup:]
    cpu = [b[1] - a[1] for a, b in zip(stamps, stamps[1:])][warmup:]
    median = statistics.median(wall)
    return {
        "s_per_step": median,
        "images_per_s": batch_size / median,
        "s_per_step_mean": statistics.fmean(wall),
        "s_per_step_min": min(wall),
        "s_per_step_stdev": statistics.stdev(wall) if len(wall) > 1 else 0.0,
        "cpu_s_per_step": statistics.median(cpu),
        "steps_timed": len(wall),
    }


def peak_memory() -> dict[str, float]:
    out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # KiB on Linux
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_gpu_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


# ---- the three sides (each runs in its own process) -------------------------------------------------------


def run_side(spec: Spec) -> dict[str, Any]:
    torch.set_num_threads(spec.threads)
    workload = WORKLOADS[spec.workload]
    side = {"sdtune": sdtune_side, "plain": plain_side, "unet_only": unet_only_side}[spec.side]
    stamps = side(spec, workload)
    return {**summarise(stamps, spec.warmup, workload.batch_size), **peak_memory()}


def sdtune_side(spec: Spec, workload: Workload) -> list[Stamp]:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from sdtune.train import train

    model = (
        ["model=tiny"] if workload.model == "tiny" else ["model=sd15", f"model.pretrained={spec.model_dir}"]
    )
    gpu = ["trainer.accelerator=gpu", "trainer.precision=bf16-mixed", "runtime.weight_dtype=bfloat16"]
    overrides = [
        *model,
        "data=shapes",
        f"data.root={spec.data_dir}",
        f"data.resolution={workload.resolution}",
        f"data.batch_size={workload.batch_size}",
        f"data.num_workers={workload.num_workers}",
        f"data.num_images={workload.batch_size * spec.total_steps}",
        f"data.cache_latents={str(spec.cache).lower()}",
        f"data.latent_cache_dir={Path(spec.cache_dir) / 'bench-latents'}",
        f"method.rank={workload.rank}",
        f"method.alpha={workload.rank}",
        f"method.target_modules=[{','.join(LORA_TARGETS)}]",
        f"trainer.max_steps={spec.total_steps}",
        *(gpu if workload.gpu else ["trainer.accelerator=cpu", "trainer.precision=32-true"]),
        f"runtime.threads={spec.threads}",
        f"runtime.compile={str(spec.compile).lower()}",
        f"runtime.compile_mode={spec.compile_mode}",
        f"runtime.channels_last={str(spec.channels_last).lower()}",
        "logger=none",
        "sampling.prompts=[]",
        "export.formats=[]",
        "+callbacks.timer._target_=sdtune.benchmark.StepTimer",
        *spec.overrides,
    ]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    run_dir = Path(tempfile.mkdtemp(prefix="sdtune-bench-")) / "run"
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    run = train(cfg)
    return next(c for c in run.trainer.callbacks if isinstance(c, StepTimer)).stamps


def _components(spec: Spec, workload: Workload) -> tuple[Any, ...]:
    """The pipeline's parts as diffusers' LoRA script sets them up: frozen, cast, U-Net LoRA in fp32."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = spec.model_dir
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    for model in (unet, vae, text_encoder):
        model.requires_grad_(False)
    device = torch.device("cuda" if workload.gpu else "cpu")
    dtype = torch.bfloat16 if workload.gpu else torch.float32
    unet.to(device, dtype)
    vae.to(device, dtype)
    text_encoder.to(device, dtype)
    lora = LoraConfig(
        r=workload.rank, lora_alpha=workload.rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS
    )
    unet.add_adapter(lora)
    cast_training_params(unet, dtype=torch.float32)
    if spec.channels_last:
        unet.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
    if spec.compile:
        unet.compile(mode=spec.compile_mode)
    return tokenizer, text_encoder, vae, unet, scheduler, device, dtype


def _plain_batches(spec: Spec, workload: Workload, tokenizer: Any) -> Any:
    """Images and tokenised captions as the diffusers script prepares them (resize, centre crop, [-1, 1])."""
    import numpy as np
    from PIL import Image

    root = Path(spec.data_dir)
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines() if line.strip()]
    size = workload.resolution

    class Pairs(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(rows)

        def __getitem__(self, i: int) -> dict[str, Any]:
            with Image.open(root / rows[i]["file_name"]) as opened:
                image = opened.convert("RGB")
            w, h = image.size
            scale = size / min(w, h)
            image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
            left, top = (image.width - size) // 2, (image.height - size) // 2
            image = image.crop((left, top, left + size, top + size))
            pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
            ids = tokenizer(
                rows[i]["text"], max_length=tokenizer.model_max_length, padding="max_length", truncation=True
            ).input_ids
            return {"pixel_values": pixels.contiguous(), "input_ids": torch.tensor(ids)}

    return torch.utils.data.DataLoader(
        Pairs(),
        batch_size=workload.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workload.num_workers,
    )


def _optimizer(unet: Any, fused: bool = False) -> tuple[Any, list[Any], Any]:
    from diffusers.optimization import get_scheduler

    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8, fused=fused or None
    )
    return optimizer, params, get_scheduler("constant", optimizer)


def _unet_step(unet, scheduler, latents, hidden, optimizer, params, lr_scheduler, autocast) -> None:  # noqa: ANN001
    import torch.nn.functional as F

    noise = torch.randn_like(latents)
    timesteps = torch.randint(
        0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device
    )
    noisy = scheduler.add_noise(latents, noise, timesteps)
    with autocast:
        pred = unet(noisy, timesteps, hidden, return_dict=False)[0]
    loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad()


def _autocast(workload: Workload) -> Any:
    from contextlib import nullcontext

    return torch.autocast("cuda", dtype=torch.bfloat16) if workload.gpu else nullcontext()


def plain_side(spec: Spec, workload: Workload) -> list[Stamp]:
    tokenizer, text_encoder, vae, unet, scheduler, device, dtype = _components(spec, workload)
    optimizer, params, lr_scheduler = _optimizer(unet)
    unet.train()
    stamps = [stamp()]
    done = 0
    while done < spec.total_steps:
        for batch in _plain_batches(spec, workload, tokenizer):
            with torch.no_grad():
                pixels = batch["pixel_values"].to(device, dtype)
                latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
                hidden = text_encoder(batch["input_ids"].to(device), return_dict=False)[0]
            _unet_step(unet, scheduler, latents, hidden, optimizer, params, lr_scheduler, _autocast(workload))
            stamps.append(stamp())
            done += 1
            if done == spec.total_steps:
                break
    return stamps


def unet_only_side(spec: Spec, workload: Workload) -> list[Stamp]:
    tokenizer, text_encoder, vae, unet, scheduler, device, dtype = _components(spec, workload)
    batch = next(iter(_plain_batches(spec, workload, tokenizer)))
    with torch.no_grad():
        latents = vae.encode(batch["pixel_values"].to(device, dtype)).latent_dist.sample()
        latents = latents * vae.config.scaling_factor
        hidden = text_encoder(batch["input_ids"].to(device), return_dict=False)[0]
    optimizer, params, lr_scheduler = _optimizer(unet, fused=workload.gpu)  # as sdtune's default on a GPU
    unet.train()
    stamps = [stamp()]
    for _ in range(spec.total_steps):
        _unet_step(unet, scheduler, latents, hidden, optimizer, params, lr_scheduler, _autocast(workload))
        stamps.append(stamp())
    return stamps


# ---- the driver -------------------------------------------------------------------------------------------


@dataclass
class Options:
    workload: str
    steps: int = 20
    warmup: int = 5
    repeats: int = 3
    threads: int | None = None
    cache: bool = False
    compile: bool = False
    compile_mode: str = "default"
    channels_last: bool = False
    sides: list[str] = field(default_factory=lambda: ["sdtune", "plain", "unet_only"])
    cache_dir: str | None = None
    overrides: list[str] = field(default_factory=list)


def _child(spec: Spec) -> dict[str, Any]:
    """Run one side in a fresh interpreter (its own peak memory) and read back its JSON result."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("WANDB_MODE", "disabled")
    code = (
        "import json, sys\n"
        "from sdtune.benchmark import RESULT_MARK, Spec, run_side\n"
        "print(RESULT_MARK + json.dumps(run_side(Spec(**json.loads(sys.argv[1])))), flush=True)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(asdict(spec))], env=env, capture_output=True, text=True
    )
    for line in reversed(out.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK) :])
    raise RuntimeError(f"benchmark side {spec.side} failed (exit {out.returncode}):\n{out.stderr[-4000:]}")


def run_benchmark(options: Options) -> dict[str, Any]:
    """Run every side `repeats` times, interleaved, and report medians, ratios and the targets."""
    from sdtune.perf import default_threads

    workload = WORKLOADS[options.workload]
    result: dict[str, Any] = {"workload": asdict(workload), "options": asdict(options)}
    if workload.unsupported:
        return {**result, "error": workload.unsupported}
    if workload.gpu and not torch.cuda.is_available():
        return {**result, "error": f"workload {workload.name} needs a CUDA GPU"}
    cache_dir = Path(options.cache_dir or os.environ.get("SDTUNE_CACHE_DIR") or Path.home() / ".cache/sdtune")
    threads = options.threads or default_threads()
    spec = Spec(
        workload=workload.name,
        side="",
        steps=options.steps,
        warmup=options.warmup,
        threads=threads,
        cache=options.cache,
        compile=options.compile,
        compile_mode=options.compile_mode,
        channels_last=options.channels_last,
        cache_dir=str(cache_dir),
        model_dir=str(ensure_model(workload, cache_dir)),
        data_dir=str(
            ensure_data(workload, workload.batch_size * (options.steps + options.warmup), cache_dir)
        ),
        overrides=options.overrides,
    )
    result["environment"] = _environment(threads)
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in options.sides}
    for _ in range(options.repeats):
        for side in options.sides:
            runs[side].append(_child(Spec(**{**asdict(spec), "side": side})))
    result["load_average_after"] = list(os.getloadavg())
    for side, side_runs in runs.items():
        result[side] = _combine(side_runs)
    result["ratios"], result["targets"] = _ratios(result, workload, options)
    return result


def _environment(threads: int) -> dict[str, Any]:
    return {
        "threads": threads,
        "cpus": os.cpu_count(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "load_average_before": list(os.getloadavg()),
    }


def _combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over repeats of each figure, plus every repeat's step time."""
    keys = [k for k in runs[0] if isinstance(runs[0][k], (int, float))]
    combined = {k: statistics.median(r[k] for r in runs) for k in keys}
    combined["s_per_step_each_repeat"] = [r["s_per_step"] for r in runs]
    return combined


def _ratios(result: dict[str, Any], workload: Workload, options: Options) -> tuple[dict, dict]:
    ratios: dict[str, float] = {}
    targets: dict[str, bool] = {}
    sd, plain, floor = result.get("sdtune"), result.get("plain"), result.get("unet_only")
    if sd and plain:
        ratios["step_time_sdtune_over_plain"] = sd["s_per_step"] / plain["s_per_step"]
        ratios["cpu_time_sdtune_over_plain"] = sd["cpu_s_per_step"] / plain["cpu_s_per_step"]
        ratios["speedup_over_plain"] = plain["s_per_step"] / sd["s_per_step"]
        ratios["peak_rss_sdtune_over_plain"] = sd["peak_rss_mib"] / plain["peak_rss_mib"]
        if not options.cache:
            targets["step_time_le_1.05x_plain"] = ratios["step_time_sdtune_over_plain"] <= 1.05
            if not workload.gpu:
                targets["peak_rss_le_1.2x_plain"] = ratios["peak_rss_sdtune_over_plain"] <= 1.2
    if sd and floor:
        ratios["step_time_sdtune_over_unet_only"] = sd["s_per_step"] / floor["s_per_step"]
        ratios["cpu_time_sdtune_over_unet_only"] = sd["cpu_s_per_step"] / floor["cpu_s_per_step"]
        if options.cache:
            targets["step_time_le_1.1x_unet_only"] = ratios["step_time_sdtune_over_unet_only"] <= 1.1
    if sd and workload.model == "sd15" and workload.resolution == 512:
        achieved = sd["images_per_s"] * TFLOP_PER_IMAGE_SD15_512
        ratios["tflops_achieved"] = achieved
        if any(chip in result["environment"]["device"] for chip in ("H100", "H200")):
            ratios["mfu_vs_hopper_bf16_dense"] = achieved / HOPPER_BF16_DENSE_TFLOPS
            targets["images_per_s_ge_" + ("170" if options.compile else "120")] = sd["images_per_s"] >= (
                170 if options.compile else 120
            )
            targets["peak_le_20_gib"] = sd.get("peak_gpu_allocated_gib", 0) <= 20
    return ratios, targets
