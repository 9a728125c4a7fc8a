"""fp32 master weights for pure-bf16 training (`trainer.precision=bf16-true`).

Under `bf16-true` Lightning casts the whole module to bf16 and runs it without autocast: no cast kernels
around every layer and no autocast dispatch, which is what a launch-bound LoRA step pays for. Stepping the
bf16 weights themselves would round small updates away (bf16 keeps 8 significant bits: an update below
1/256 of a weight is lost), so the optimizer steps fp32 copies ("master weights", as in apex's O2 and
Megatron's mixed precision) and each step writes them back, rounded, into the bf16 weights the model
computes with:

    backward (bf16 grads on the model)  ->  take_grads: fp32 master grads (clipping sees these)
    optimizer.step on the masters       ->  write_back: masters rounded into the model's weights
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

MASTER_PRECISIONS = ("bf16-true",)


class MasterWeights:
    """fp32 copies of the trainable weights, in the order the optimizer's groups list them."""

    def __init__(self, named: dict[str, Tensor], initial: dict[str, Tensor] | None = None) -> None:
        self.names = list(named)
        self.params = list(named.values())
        initial = initial or {}
        self.masters = [
            (initial[name] if name in initial else param).detach().to(param.device, torch.float32).clone()
            for name, param in named.items()
        ]
        # fp32 gradient buffers kept across steps: one multi-tensor copy fills them (a per-tensor cast would
        # be one kernel launch per LoRA matrix, and a LoRA step is launch-bound on a GPU)
        self.grads = [torch.zeros_like(master) for master in self.masters]
        self.write_back()  # a resumed run computes with its checkpoint's values from the first step

    def by_param(self) -> dict[int, Tensor]:
        """id(model weight) -> its master: to rebuild optimizer groups over the masters."""
        return {id(param): master for param, master in zip(self.params, self.masters)}

    def named(self) -> dict[str, Tensor]:
        return dict(zip(self.names, self.masters))

    @torch.no_grad()
    def take_grads(self) -> None:
        """Move the model's (reduced, accumulated) bf16 gradients onto the masters as fp32."""
        present = [i for i, param in enumerate(self.params) if param.grad is not None]
        if present:
            torch._foreach_copy_([self.grads[i] for i in present], [self.params[i].grad for i in present])
        for i, (param, master) in enumerate(zip(self.params, self.masters)):
            master.grad = self.grads[i] if param.grad is not None else None
            param.grad = None

    @torch.no_grad()
    def write_back(self, *_: Any) -> None:
        """The stepped masters into the model's weights (rounded to their dtype). Also a step post-hook."""
        if self.params:
            torch._foreach_copy_(self.params, self.masters)

    @torch.no_grad()
    def load(self, values: dict[str, Tensor]) -> None:
        """Checkpoint values (fp32) into the masters and the model."""
        for name, master in zip(self.names, self.masters):
            if name in values:
                master.copy_(values[name])
        self.write_back()


def over_masters(groups: list[dict[str, Any]], masters: MasterWeights) -> list[dict[str, Any]]:
    """The same optimizer groups with each model weight replaced by its master."""
    lookup = masters.by_param()
    return [{**group, "params": [lookup[id(p)] for p in group["params"]]} for group in groups]


def needs_masters(precision: str, runtime: Any) -> bool:
    """True when the trainable weights compute in bf16 and `runtime.master_weights` (default true) asks for
    fp32 copies."""
    return str(precision) in MASTER_PRECISIONS and bool((runtime or {}).get("master_weights", True))
