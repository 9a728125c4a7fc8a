"""`method.optimizer`: the optimizers kohya's sd-scripts offers as `--optimizer_type`, by sdtune name.

Every one takes `method.lr` and `method.weight_decay`; the AdamW family and Prodigy also `method.betas` and
`method.eps`, while the others keep their authors' defaults (Lion's betas are (0.9, 0.99), not Adam's).
`method.optimizer_args` (sd-scripts' `--optimizer_args`) sets any constructor argument, overriding the rest.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

# name -> (import path of the class, the fixed arguments sd-scripts gives it)
OPTIMIZERS: dict[str, tuple[str, dict[str, Any]]] = {
    "adamw": ("torch.optim.AdamW", {}),
    "adamw8bit": ("bitsandbytes.optim.AdamW8bit", {}),
    "paged_adamw8bit": ("bitsandbytes.optim.PagedAdamW8bit", {}),
    "lion": ("bitsandbytes.optim.Lion", {}),
    "lion8bit": ("bitsandbytes.optim.Lion8bit", {}),
    "sgd_nesterov": ("torch.optim.SGD", {"momentum": 0.9, "nesterov": True}),
    # adapts its own step size: method.lr is a multiplier on it (1.0 as sd-scripts' users run it)
    "prodigy": ("prodigyopt.Prodigy", {}),
    # a fixed learning rate, as sd-scripts runs it when given one (no relative step, no parameter scaling)
    "adafactor": (
        "transformers.optimization.Adafactor",
        {"relative_step": False, "scale_parameter": False, "warmup_init": False},
    ),
}
ADAM_FAMILY = ("adamw", "adamw8bit", "paged_adamw8bit", "prodigy")


def optimizer_class(name: str) -> type:
    module, _, attribute = OPTIMIZERS[name][0].rpartition(".")
    return getattr(importlib.import_module(module), attribute)


def optimizer_kwargs(method: Any) -> dict[str, Any]:
    """The constructor arguments of `method.optimizer` besides the parameter groups."""
    name = method.optimizer
    kwargs: dict[str, Any] = {"lr": method.lr, "weight_decay": method.weight_decay, **OPTIMIZERS[name][1]}
    if name in ADAM_FAMILY:
        kwargs |= {"betas": tuple(method.betas), "eps": method.eps}
    for key, value in _args(method).items():
        kwargs[key] = tuple(value) if isinstance(value, list) else value
    return kwargs


def build_optimizer(method: Any, groups: list[dict[str, Any]], **extra: Any) -> Any:
    """`extra` (sdtune's own choices, e.g. fused) gives way to what the user set in `optimizer_args`."""
    return optimizer_class(method.optimizer)(groups, **(extra | optimizer_kwargs(method)))


def optimizer_problems(method: Any) -> list[str]:
    """An unknown optimizer, or `optimizer_args` its constructor does not take (checked before any work)."""
    name = method.get("optimizer")
    if name not in OPTIMIZERS:
        return [f"method.optimizer: {name!r} is not one of {', '.join(OPTIMIZERS)}"]
    args = method.get("optimizer_args")
    if args is None:
        return []
    if not hasattr(args, "items"):
        example = "{betas: [0.9, 0.99]}"
        return [
            f"method.optimizer_args: must be a mapping of constructor arguments, e.g. {example}, got {args!r}"
        ]
    accepted = set(inspect.signature(optimizer_class(name)).parameters) - {"self", "params"}
    unknown = sorted(set(args) - accepted)
    if unknown:
        return [
            f"method.optimizer_args: {OPTIMIZERS[name][0]} takes no {unknown}; it takes {sorted(accepted)}"
        ]
    if isinstance(method.get("lr"), bool) or not isinstance(method.get("lr"), int | float):
        return []  # method.lr is reported on its own
    try:  # the values too (betas out of range, a string for a number): on one weight, before any model loads
        build_optimizer(method, [{"params": [torch.nn.Parameter(torch.zeros(1))]}])
    except (TypeError, ValueError) as error:
        return [f"method.optimizer_args: {OPTIMIZERS[name][0]} refuses {_args(method)}: {error}"]
    return []


def kohya_optimizer_name(method: Any) -> str:
    """sd-scripts' `ss_optimizer`: the class path, then `(key=value,…)` when optimizer arguments are given."""
    name = method.get("optimizer")
    path = OPTIMIZERS[name][0] if name in OPTIMIZERS else str(name)
    args = _args(method)
    return path + (f"({','.join(f'{k}={v}' for k, v in args.items())})" if args else "")


def _args(method: Any) -> dict[str, Any]:
    args = method.get("optimizer_args")
    return OmegaConf.to_container(args) if isinstance(args, DictConfig) else dict(args or {})
