"""Typed value checks shared by every entry point: numbers, flags and the tables of keys `validate` checks
by type (a string where a number belongs would otherwise fail deep in Lightning or torch)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

Report = Callable[[str], None]


def require_number(report: Report, key: str, value: Any, test: Callable[[Any], bool], what: str) -> None:
    """Report `key` unless `value` is a number (not a bool) that passes `test`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not test(value):
        report(f"{key}: must be {what}, got {value!r}")


def require_flag(report: Report, key: str, value: Any) -> None:
    """Report `key` unless it is true or false (`overwrite=yes` would otherwise count as true)."""
    if not isinstance(value, bool):
        report(f"{key}: must be true or false, got {value!r}")


def is_count(value: Any) -> bool:
    """An integer >= 1 (a bool is not one: `require_number` refuses those first)."""
    return isinstance(value, int) and value >= 1


def is_index(value: Any) -> bool:
    """An integer >= 0."""
    return isinstance(value, int) and value >= 0


def is_fraction(value: Any) -> bool:
    """A number in [0, 1] (`require_number` has refused non-numbers first)."""
    return 0 <= value <= 1


def _integer(value: Any) -> bool:
    return isinstance(value, int)


# Numeric keys the other checks do not cover, by what they must be. Keys absent from a config are skipped.
NUMBERS: dict[str, tuple[Callable[[Any], bool], str]] = {
    **dict.fromkeys(
        ["model.resolution", "data.num_images", "data.synthetic.num_images", "trainer.log_every_n_steps"]
        + ["conditioning.text.clip_skip"]
        + ["sampling.per_prompt", "evaluation.per_prompt", "evaluation.steps", "evaluation.batch_size"],
        (is_count, "an integer >= 1"),
    ),
    **dict.fromkeys(
        ["seed", "data.seed", "data.synthetic.seed", "data.class_generation.seed", "sampling.seed"]
        + ["evaluation.seed", "trainer.num_sanity_val_steps", "callbacks.checkpoint.save_top_k"],
        (_integer, "an integer"),
    ),
    **dict.fromkeys(
        [
            "data.num_workers",
            "data.keep_tokens",
            "evaluation.every_n_steps",
            "loss.multires_noise_iterations",
        ],
        (is_index, "an integer >= 0"),
    ),
    **dict.fromkeys(
        ["method.weight_decay", "loss.noise_offset", "sampling.guidance", "evaluation.guidance"]
        + ["loss.input_perturbation"]
        + ["data.class_generation.guidance", "trainer.limit_val_batches"],
        (lambda v: v >= 0, "a number >= 0"),
    ),
    "method.eps": (lambda v: v > 0, "a positive number"),
    "loss.multires_noise_discount": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "data.caption_tag_dropout": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    **dict.fromkeys(
        [
            "sampling.guidance_rescale",
            "evaluation.guidance_rescale",
            "data.class_generation.guidance_rescale",
        ],
        (is_fraction, "a number in [0, 1]"),
    ),
}
NULLABLE: dict[str, tuple[Callable[[Any], bool], str]] = {
    "trainer.gradient_clip_val": (lambda v: v >= 0, "a number >= 0 or null"),
    "callbacks.checkpoint.every_n_train_steps": (is_index, "an integer >= 0 or null"),
}


# true/false keys: a string there (`data.cache_latents=yes`) would count as true wherever it is tested.
FLAGS = (
    *("method.train_text_encoder", "method.use_rslora", "method.zero_terminal_snr", "method.scale_lr"),
    *("method.gradient_checkpointing", "method.ema.warmup", "data.cache_latents", "data.random_flip"),
    *("data.center_crop", "data.bucketing", "export.ema", "model.allow_pickle", "runtime.tune_malloc"),
    "data.shuffle_caption",
    "loss.debiased_estimation",
    *("callbacks.checkpoint.save_last", "trainer.enable_model_summary", "runtime.master_weights"),
    *("runtime.cudnn_benchmark", "runtime.fused_optimizer", "runtime.channels_last", "runtime.compile"),
    "runtime.gradient_checkpointing",
)


def check_types(cfg: DictConfig, report: Report) -> None:
    """Report every key of the type tables (and `method.betas`, `trainer.devices`) holding the wrong type."""
    absent = object()
    for key in FLAGS:
        value = OmegaConf.select(cfg, key, default=absent)
        if value is not absent:
            require_flag(report, key, value)
    for table, nullable in ((NUMBERS, False), (NULLABLE, True)):
        for key, (test, what) in table.items():
            value = OmegaConf.select(cfg, key, default=absent)
            if value is absent or (nullable and value is None):
                continue
            require_number(report, key, value, test, what)
    betas = OmegaConf.select(cfg, "method.betas", default=absent)
    if betas is not absent and not (
        isinstance(betas, ListConfig | list | tuple)
        and len(betas) == 2
        and all(not isinstance(b, bool) and isinstance(b, int | float) and 0 <= b < 1 for b in betas)
    ):
        report(f"method.betas: must be two numbers in [0, 1), e.g. [0.9, 0.999], got {betas!r}")
    devices = OmegaConf.select(cfg, "trainer.devices", default=absent)
    if devices is not absent and not _devices_ok(devices):
        report(f"trainer.devices: must be auto, an integer >= 1 or a list of device indices, got {devices!r}")


def _devices_ok(devices: Any) -> bool:
    if devices in ("auto", -1) or (is_count(devices) and not isinstance(devices, bool)):
        return True
    if isinstance(devices, str):  # Lightning also takes "0,1" or "2"
        return all(part.strip().isdigit() for part in devices.split(",") if part.strip())
    return isinstance(devices, ListConfig | list) and all(is_index(d) for d in devices)
