"""Count the aten operations one LoRA training step dispatches, under bf16 autocast and under pure bf16.

    python scripts/count_ops.py [--arch sd15] [--rank 16]

A LoRA step on a GPU is bound by kernel launches, not arithmetic, so the number of operations per step is
what `trainer.precision=bf16-true` (no autocast, fp32 master weights) is meant to cut. Counting them needs no
GPU: this runs the real architecture (random weights) on the CPU at an 8×8 latent, batch 1, with the same
step as sdtune's two precisions:

  bf16-mixed  bf16 frozen base, fp32 LoRA weights, autocast, AdamW over the LoRA weights
  bf16-true   everything bf16, no autocast; AdamW over fp32 masters (`sdtune.precision.MasterWeights`)

View operations (reshape, transpose, ...) launch no kernel and are counted apart. On a GPU the optimizer is
torch's fused AdamW (one launch); on the CPU it runs tensor by tensor, so compare the forward/backward share.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdtune.benchmark_workloads import ARCHITECTURES, LORA_TARGETS  # noqa: E402
from sdtune.precision import MasterWeights, over_masters  # noqa: E402

VIEWS = {
    "view", "_unsafe_view", "t", "transpose", "permute", "expand", "unsqueeze", "squeeze", "reshape", "slice",
    "select", "split", "split_with_sizes", "chunk", "as_strided", "alias", "detach", "unbind",
}  # fmt: skip
CASTS = {"_to_copy", "copy_", "_foreach_copy_"}


class Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def build(arch: str, rank: int) -> Any:
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**ARCHITECTURES[arch]["unet"], "sample_size": 8})
    unet.requires_grad_(False)
    unet.to(torch.bfloat16)
    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
    )
    return unet


def count(unet: Any, precision: str) -> dict[str, Any]:
    named = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    mixed = precision == "bf16-mixed"
    for param in named.values():
        param.data = param.data.to(torch.float32 if mixed else torch.bfloat16)
    masters = None if mixed else MasterWeights(named)
    groups = [{"params": list(named.values())}]
    optimizer = torch.optim.AdamW(over_masters(groups, masters) if masters else groups, lr=1e-4)
    if masters:
        optimizer.register_step_post_hook(masters.write_back)
    latents = torch.randn(1, 4, 8, 8, dtype=torch.bfloat16)
    hidden = torch.randn(1, 77, unet.config.cross_attention_dim, dtype=torch.bfloat16)

    def step() -> None:
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1000, (1,))
        with torch.autocast("cpu", dtype=torch.bfloat16) if mixed else nullcontext():
            pred = unet(latents + noise, timesteps, hidden, return_dict=False)[0]
        F.mse_loss(pred.float(), noise.float()).backward()
        if masters:
            masters.take_grads()
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # lazy state (AdamW moments) outside the count
    counter = Counter()
    with counter:
        step()
    ops = counter.ops
    return {
        "precision": precision,
        "lora_tensors": len(named),
        "aten_ops": sum(ops.values()),
        "non_view_ops": sum(v for k, v in ops.items() if k not in VIEWS),
        "casts_and_copies": sum(ops[k] for k in CASTS),
        "most_common": ops.most_common(6),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="sd15", choices=sorted(ARCHITECTURES))
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    unet = build(args.arch, args.rank)
    for precision in ("bf16-mixed", "bf16-true"):
        print(json.dumps(count(unet, precision)), flush=True)


if __name__ == "__main__":
    main()
