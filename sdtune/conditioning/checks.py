"""Up-front checks of the `conditioning` config against the data, method, sampling and export configs."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig

DEFAULT_BATCH_KEYS = ("pixel_values", "caption")


def check_conditioning(cfg: DictConfig, report: Callable[[str], None]) -> None:
    """Report every problem of the conditioning components with the rest of a composed `train.yaml`."""
    from sdtune.conditioning.text import MAX_TOKEN_LENGTHS
    from sdtune.formats.exporters import LORA_FORMATS

    data_cls = _locate(cfg.data.get("_target_"))
    provided = getattr(data_cls, "batch_keys", DEFAULT_BATCH_KEYS)
    concat, inputs = [], []
    for name, component in cfg.conditioning.items():
        cls = _locate(component.get("_target_"))
        if cls is None:
            report(f"conditioning.{name}._target_: cannot import {component.get('_target_')!r}")
            continue
        key = component.get("key", _default(cls, "key"))
        if key is not None and key not in provided:
            report(
                f"conditioning.{name}: reads batch key {key!r}, which data={cfg.data.name} does not provide "
                f"(it provides {', '.join(provided)}); choose a data config with it, e.g. the one "
                f"conditioning=… selects by default"
            )
        length = component.get("max_token_length", 75)
        if length not in MAX_TOKEN_LENGTHS:
            report(f"conditioning.{name}.max_token_length: got {length!r}; use 75, 150 or 225")
        modes = getattr(cls, "resize_modes", None)
        if modes and component.get("resize", modes[0]) not in modes:
            report(f"conditioning.{name}.resize: {component.resize!r}; valid: {', '.join(modes)}")
        for problem in getattr(cls, "config_problems", lambda *_: [])(component, cfg.data):
            report(f"conditioning.{name}.{problem}")
        if getattr(cls, "slot", None) == "concat":
            concat.append(name)
        if getattr(cls, "input", None):
            inputs.append(name)
    if concat:
        _check_concat(cfg, concat, report, LORA_FORMATS)
    if "num_classes" in cfg.data and (not isinstance(cfg.data.num_classes, int) or cfg.data.num_classes < 1):
        report(f"data.num_classes: must be a positive integer, got {cfg.data.num_classes!r}")
    unknown = [n for n in cfg.sampling.condition_guidance or {} if n not in cfg.conditioning]
    if unknown:
        report(
            f"sampling.condition_guidance: unknown condition(s) {unknown}; "
            f"the conditioning has {list(cfg.conditioning)}"
        )
    from_data = cfg.sampling.from_data
    if (from_data or (from_data is None and inputs)) and not hasattr(data_cls, "condition_batch"):
        report(
            f"sampling.from_data: data={cfg.data.name} cannot serve conditions for samples; "
            "set sampling.from_data=0 (prompts only)"
        )
    if from_data == 0 and inputs:
        report(
            f"sampling.from_data: {', '.join(f'conditioning.{n}' for n in inputs)} needs more than a prompt; "
            "set sampling.from_data to the number of training samples to condition on (or null)"
        )


def _check_concat(
    cfg: DictConfig, concat: list[str], report: Callable[[str], None], lora_formats: tuple
) -> None:
    names = ", ".join(f"conditioning.{n}" for n in concat)
    formats = list(cfg.export.formats)
    lora_only = [f for f in formats if f in lora_formats]
    if lora_only:
        report(
            f"export.formats: {lora_only} hold only LoRA weights, but {names} feeds the U-Net's concat slot, "
            "so the model needs its new input weights (conv_in) too; use export.formats=[merged]"
        )
    if "single_file" in formats:
        report(
            f"export.formats: single_file cannot hold a U-Net with extra input channels ({names}); "
            "use export.formats=[merged]"
        )
    if "conv_in" in cfg.method.get("target_modules", []):
        report(
            f"method.target_modules: conv_in is widened and trained in full for {names}; "
            "remove it from the LoRA targets"
        )


def _locate(target: str | None) -> Any:
    from hydra.utils import get_class

    if not target:
        return None
    try:
        return get_class(target)
    except Exception:  # hydra wraps import failures of every kind
        return None


def _default(cls: type, parameter: str) -> Any:
    found = inspect.signature(cls.__init__).parameters.get(parameter)
    return None if found is None or found.default is inspect.Parameter.empty else found.default
