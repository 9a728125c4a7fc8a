"""Speed and memory levers (the `runtime` config group): CPU threads, weight dtypes, gradient checkpointing,
attention kernel, channels_last, torch.compile, a quantised frozen base, and keeping cached encoders off the
accelerator. None of them changes what is learned, only what it costs."""

from __future__ import annotations

import ctypes
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from sdtune.config import ConfigError
from sdtune.precision import MASTER_PRECISIONS, needs_masters

log = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
# trainer.precision values under which a frozen base of each reduced dtype is computed (autocast).
MIXED_PRECISION = {torch.bfloat16: ("bf16-mixed", "bf16"), torch.float16: ("16-mixed", "16")}
ATTENTION = ("sdpa", "eager")
QUANTIZE = ("int8", "nf4")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


# ---- CPU threads ------------------------------------------------------------------------------------------


def physical_cores() -> int | None:
    """Physical cores of this machine from /proc/cpuinfo (None where it does not say)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    cores, physical = set(), "0"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            physical = value.strip()
        elif key == "core id":
            cores.add((physical, value.strip()))
    return len(cores) or None


def cgroup_cpu_limit() -> int | None:
    """The CPU quota of this container (cgroup v2 `cpu.max`), rounded up; None when unlimited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else max(1, math.ceil(int(quota) / int(period)))


def default_threads(local_processes: int = 1) -> int:
    """Physical cores this process may use (affinity, cgroup quota), shared among `local_processes`."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count() or 1
    for limit in (physical_cores(), cgroup_cpu_limit()):
        if limit:
            usable = min(usable, limit)
    return max(1, usable // max(1, local_processes))


def local_cpu_processes(trainer: DictConfig) -> int:
    """Training processes sharing this node's CPU cores: `trainer.devices` for CPU DDP, else 1."""
    devices = trainer.get("devices", 1)
    on_cpu = trainer.get("accelerator") == "cpu" or not torch.cuda.is_available()
    return devices if on_cpu and isinstance(devices, int) and devices > 1 else 1


def configure_threads(threads: int | None, local_processes: int = 1) -> int:
    """Set torch's intra-op thread count (null = all physical cores available) and log it."""
    chosen = threads or default_threads(local_processes)
    torch.set_num_threads(chosen)
    source = "runtime.threads" if threads else f"physical cores / {local_processes} local process(es)"
    log.info("torch CPU threads: %d (%s)", chosen, source)
    return chosen


# glibc mallopt parameters
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def tune_malloc() -> bool:
    """glibc: reuse freed activation memory instead of handing it back to the kernel every step.

    By default glibc serves large blocks with fresh mmaps and trims the heap top after frees, adapting the
    thresholds as it goes; in a process that has imported a lot (Lightning, Hydra, …) that adaptation often
    does not happen, and every CPU step page-faults its activations in again (measured: 40 k page faults and
    ~10% of a 128 px step). Fixed thresholds (blocks under 32 MiB from the heap, keep up to 256 MiB of free
    heap) remove the faults without raising the peak memory. Returns False where the C library is not glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 256 << 20))


def configure_process(runtime: DictConfig, trainer: DictConfig) -> None:
    """Process-wide settings of `runtime`: torch's thread count, the allocator tuning, cuDNN autotuning."""
    configure_threads(runtime.threads, local_cpu_processes(trainer))
    # Lightning turns this off again under trainer.deterministic (its `benchmark` stays unset).
    torch.backends.cudnn.benchmark = bool(runtime.get("cudnn_benchmark", False))
    if runtime.get("tune_malloc", True) and tune_malloc():
        log.info("glibc malloc: mmap threshold 32 MiB, trim threshold 256 MiB (runtime.tune_malloc)")


# ---- validation -------------------------------------------------------------------------------------------


def check_runtime(cfg: DictConfig, report: Any) -> None:
    """Report every invalid `runtime.*` key (called by `sdtune.config.validate`)."""
    runtime = cfg.get("runtime")
    if runtime is None:
        return
    threads = runtime.threads
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        report(f"runtime.threads: must be null (all physical cores) or an integer >= 1, got {threads!r}")
    for key in ("weight_dtype", "vae_dtype"):
        if runtime[key] is not None and runtime[key] not in DTYPES:
            report(f"runtime.{key}: {runtime[key]!r} is not one of null, float32, bfloat16, float16")
    precision = str(cfg.trainer.precision)
    weight = DTYPES.get(runtime.weight_dtype or "float32")
    if weight in MIXED_PRECISION and precision not in MIXED_PRECISION[weight] + MASTER_PRECISIONS:
        name = MIXED_PRECISION[weight][0]
        report(
            f"runtime.weight_dtype: a {runtime.weight_dtype} frozen base is computed under autocast; set "
            f"trainer.precision={name} (trainable weights stay float32), or runtime.weight_dtype=null"
        )
    if precision in MASTER_PRECISIONS:
        _check_pure_bf16(cfg, runtime, report)
    on_cpu = cfg.trainer.accelerator == "cpu" or not torch.cuda.is_available()
    if on_cpu and torch.float16 in (weight, DTYPES.get(runtime.vae_dtype or "float32")):
        report("runtime.weight_dtype/vae_dtype: float16 needs a GPU; on CPU use bfloat16 or null")
    if runtime.attention not in ATTENTION:
        report(f"runtime.attention: {runtime.attention!r} is not one of {', '.join(ATTENTION)}")
    if runtime.compile_mode not in COMPILE_MODES:
        report(f"runtime.compile_mode: {runtime.compile_mode!r} is not one of {', '.join(COMPILE_MODES)}")
    _check_quantize(cfg, runtime, on_cpu, report)
    aspect = cfg.data.get("bucket_max_aspect", 2.0)
    if not isinstance(aspect, (int, float)) or aspect < 1:
        report(f"data.bucket_max_aspect: must be a number >= 1 (2.0 = up to 2:1), got {aspect!r}")


def _check_pure_bf16(cfg: DictConfig, runtime: DictConfig, report: Any) -> None:
    """bf16-true casts every weight to bf16 (Lightning's HalfPrecision): other dtypes cannot hold."""
    for key in ("weight_dtype", "vae_dtype"):
        if runtime[key] not in (None, "bfloat16"):
            report(
                f"runtime.{key}: trainer.precision=bf16-true computes every weight in bfloat16, so "
                f"{runtime[key]} cannot apply; set runtime.{key}=null, or trainer.precision=bf16-mixed "
                "(autocast) to keep it"
            )
    if cfg.method.name == "vae":
        report(
            "trainer.precision=bf16-true: autoencoder training (method=vae) keeps no fp32 master weights; "
            "use trainer.precision=bf16-mixed"
        )
    from sdtune.distributed import strategy_name

    if runtime.get("master_weights", True) and strategy_name(cfg.trainer) == "fsdp":
        report(
            "trainer.precision=bf16-true: sdtune's fp32 master weights do not cover FSDP's sharded "
            "parameters; with trainer=fsdp use trainer.precision=bf16-mixed"
        )


def _check_quantize(cfg: DictConfig, runtime: DictConfig, on_cpu: bool, report: Any) -> None:
    if runtime.quantize is None:
        return
    if runtime.quantize not in QUANTIZE:
        report(f"runtime.quantize: {runtime.quantize!r} is not one of null, {', '.join(QUANTIZE)}")
    elif on_cpu:
        report(
            "runtime.quantize: a bitsandbytes 8/4-bit frozen base needs a CUDA GPU (bitsandbytes cannot "
            "quantise the U-Net on CPU); on CPU set runtime.quantize=null — runtime.weight_dtype=bfloat16 "
            "with trainer.precision=bf16-mixed halves the base's memory instead"
        )
    if cfg.method.name != "lora":
        report(f"runtime.quantize: only LoRA trains on a quantised base, not method={cfg.method.name}")


# ---- applying the levers ----------------------------------------------------------------------------------


def quantize_base(stack: Any, runtime: DictConfig) -> None:
    """Replace the frozen U-Net and text encoder with bitsandbytes 8-bit / 4-bit (nf4) copies (GPU only).

    Call before the method adds its adapters: peft then wraps the quantised linear layers (QLoRA-style).
    """
    if runtime.get("quantize") is None:
        return
    from diffusers import BitsAndBytesConfig as DiffusersBnb
    from diffusers import UNet2DConditionModel
    from transformers import BitsAndBytesConfig as TransformersBnb
    from transformers import CLIPTextModel

    source = Path(stack.base_model)
    if source.is_file():
        raise ConfigError(
            [
                "runtime.quantize: needs the base model as a diffusers folder or hub id, not a single file; "
                "convert it once with `python -m sdtune.export format=merged`"
            ]
        )
    compute = DTYPES.get(runtime.weight_dtype or "bfloat16", torch.bfloat16)
    if runtime.quantize == "int8":
        kwargs: dict[str, Any] = {"load_in_8bit": True}
    else:
        kwargs = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": compute}
    device = {"": torch.cuda.current_device()}
    stack.unet = UNet2DConditionModel.from_pretrained(
        str(source), subfolder="unet", quantization_config=DiffusersBnb(**kwargs), torch_dtype=compute
    )
    stack.text_encoder = CLIPTextModel.from_pretrained(
        str(source),
        subfolder="text_encoder",
        quantization_config=TransformersBnb(**kwargs),
        torch_dtype=compute,
        device_map=device,
    )
    for part in (stack.unet, stack.text_encoder):
        part.requires_grad_(False)
        part.eval()
    log.info("frozen U-Net and text encoder quantised to %s (bitsandbytes)", runtime.quantize)


def apply_runtime(stack: Any, runtime: DictConfig | None) -> None:
    """Apply the dtype, attention, memory-format, checkpointing and compile levers to the adapted stack."""
    if runtime is None:
        return
    from diffusers.training_utils import cast_training_params

    weight = DTYPES.get(runtime.weight_dtype or "float32")
    vae = DTYPES.get(runtime.vae_dtype or "") or weight
    parts = [(stack.vae, vae)]
    if runtime.get("quantize") is None:
        parts += [(stack.unet, weight)] + [(encoder, weight) for encoder in stack.text_encoders]
    for part, dtype in parts:
        if part.dtype != dtype:
            part.to(dtype)
    cast_training_params([stack.unet, *stack.text_encoders], torch.float32)  # what trains stays fp32
    if runtime.gradient_checkpointing:
        stack.unet.enable_gradient_checkpointing()
        for encoder in stack.text_encoders:
            if any(p.requires_grad for p in encoder.parameters()):
                encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    set_attention(stack, runtime.attention)
    if runtime.channels_last:
        stack.unet.to(memory_format=torch.channels_last)
        stack.vae.to(memory_format=torch.channels_last)
    if runtime.compile:
        stack.unet.compile(mode=runtime.compile_mode, backend=runtime.compile_backend)


def set_attention(stack: Any, attention: str) -> None:
    """`sdpa`: torch's fused scaled-dot-product attention (diffusers' default); `eager`: the plain maths."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    processor = AttnProcessor2_0 if attention == "sdpa" else AttnProcessor
    for model in (stack.unet, stack.vae):
        model.set_attn_processor(processor())


def vae_needs_full_precision(runtime: DictConfig | None) -> bool:
    """True when `runtime.vae_dtype=float32`: encode outside autocast (fp16 SDXL VAE overflows)."""
    return runtime is not None and DTYPES.get(runtime.get("vae_dtype") or "") is torch.float32


class EncoderOffload(pl.Callback):
    """With latents (and text) cached, training never runs the VAE encoder (nor a frozen text encoder): keep
    them in CPU memory rather than on the accelerator. The VAE decoder stays for validation samples; prompts
    for samples are encoded on the CPU and moved to the U-Net's device."""

    def __init__(self, text: bool) -> None:
        self.text = text

    def on_fit_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        vae = pl_module.vae
        for part in (vae.encoder, getattr(vae, "quant_conv", None)):
            if part is not None:
                part.to("cpu")
        if self.text:
            for component in pl_module.conditioning.components.values():
                encoders = getattr(component, "encoders", [])  # SDXL: both
                frozen = encoders and not any(p.requires_grad for e in encoders for p in e.parameters())
                if frozen and all(getattr(e, "hf_quantizer", None) is None for e in encoders):  # bnb stays
                    for encoder in encoders:
                        encoder.to("cpu")
                    component.output_device = pl_module.device
        if pl_module.device.type == "cuda":
            torch.cuda.empty_cache()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        """Lightning has moved the module back to the CPU by now; leave every part where the module is."""
        pl_module.vae.to(pl_module.device)
        for component in pl_module.conditioning.components.values():
            if getattr(component, "output_device", None) is not None:
                component.output_device = None
                for encoder in component.encoders:
                    encoder.to(pl_module.device)


def prepare_training(cfg: DictConfig, datamodule: Any, module: Any) -> list[pl.Callback]:
    """Per-run speed set-up after the module is built: VAE precision, and the latent/text cache (built now,
    before the Trainer starts) with its encoder offload. Returns the callbacks it needs."""
    module.vae_full_precision = vae_needs_full_precision(cfg.get("runtime"))
    # fp16's loss scaling needs the gradients unscaled before clipping, which a fused AdamW does in its step.
    fp16_scaled = str(cfg.trainer.get("precision")) in ("16-mixed", "16")
    module.fused_optimizer = bool((cfg.get("runtime") or {}).get("fused_optimizer", True)) and not fp16_scaled
    module.master_weights = needs_masters(cfg.trainer.get("precision"), cfg.get("runtime"))
    if not cfg.data.get("cache_latents"):
        return []
    from sdtune.data.cache import cache_device, prepare_cache

    root = Path(cfg.data.get("latent_cache_dir") or Path(cfg.paths.cache_dir) / "latents").expanduser()
    device = cache_device(cfg.trainer.accelerator)
    report = prepare_cache(datamodule, module.stack, module.conditioning, root, device, datamodule.batch_size)
    return [EncoderOffload(text=report.text_cached)]
