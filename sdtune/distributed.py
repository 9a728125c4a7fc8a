"""Scaling out: the SLURM environment, config resolvers, validation, batch semantics and LR scaling.

Lightning does the distributed work (DDP/FSDP strategies, DistributedSampler, the SLURM and torchrun
environments); this module makes the choices explicit and checks them before anything expensive starts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)

# Module classes that become FSDP units (trainer=fsdp), by name (diffusers/transformers are imported lazily).
FSDP_WRAP_CLASSES = {
    "BasicTransformerBlock": "diffusers.models.attention.BasicTransformerBlock",
    "ResnetBlock2D": "diffusers.models.resnet.ResnetBlock2D",
    "CLIPEncoderLayer": "transformers.models.clip.modeling_clip.CLIPEncoderLayer",
}


# ---- SLURM ----------------------------------------------------------------------------------------------


def under_slurm() -> bool:
    """True in a process started by `srun` (Lightning's `SLURMEnvironment.detect()`, without its warning).

    A job (or step) named `bash` or `interactive` is not treated as SLURM-managed, as in Lightning.
    """
    return "SLURM_NTASKS" in os.environ and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def slurm_tasks_per_node() -> int | None:
    """`--ntasks-per-node` of the job (or the first entry of SLURM_TASKS_PER_NODE, e.g. "2(x3)")."""
    value = os.environ.get("SLURM_NTASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE")
    return int(value.split("(")[0].split(",")[0]) if value else None


def slurm_num_nodes() -> int | None:
    value = os.environ.get("SLURM_NNODES") or os.environ.get("SLURM_JOB_NUM_NODES")
    return int(value) if value else None


def cluster_plugins() -> list[Any]:
    """Trainer plugins: under SLURM, Lightning's SLURM environment without its in-signal-handler requeue.

    Preemption is handled by `sdtune.callbacks.requeue.SlurmRequeue`, which checkpoints at a step boundary.
    """
    if not under_slurm():
        return []
    from lightning_fabric.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)]


# ---- config resolvers -----------------------------------------------------------------------------------


def _slurm_devices(default: Any = 1) -> Any:
    """`trainer.devices`: the tasks per node under SLURM (one process per task), else `default`."""
    return (slurm_tasks_per_node() or default) if under_slurm() else default


def _slurm_nodes(default: Any = 1) -> Any:
    """`trainer.num_nodes`: the job's node count under SLURM, else `default`."""
    return (slurm_num_nodes() or default) if under_slurm() else default


def _sweep_group() -> str | None:
    """The W&B group of a run: the sweep directory's name in a `-m` sweep (one group per sweep), else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    return os.path.basename(os.path.normpath(hydra_cfg.sweep.dir))


def register_resolvers() -> None:
    """Register the `sdtune_slurm_devices`, `sdtune_slurm_nodes` and `sdtune_sweep_group` config resolvers."""
    resolvers: dict[str, Callable[..., Any]] = {
        "sdtune_slurm_devices": _slurm_devices,
        "sdtune_slurm_nodes": _slurm_nodes,
        "sdtune_sweep_group": _sweep_group,
    }
    for name, resolver in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


register_resolvers()


# ---- strategies -----------------------------------------------------------------------------------------


def strategy_name(trainer: DictConfig) -> str:
    """`ddp`, `ddp_spawn`, `ddp_fork`, `fsdp`, or the strategy string as given (e.g. `auto`)."""
    strategy = trainer.strategy
    if isinstance(strategy, str):
        return strategy
    target = str(strategy.get("_target_", ""))
    if target.endswith("DDPStrategy"):
        method = strategy.get("start_method", "popen")
        return "ddp" if method == "popen" else f"ddp_{method}"
    if target.endswith(("FSDPStrategy", "fsdp_strategy")):
        return "fsdp"
    return target.rsplit(".", 1)[-1]


def fit_runs_in_child_processes(trainer: pl.Trainer) -> bool:
    """True for ddp_spawn / ddp_fork: `fit` trains in child processes and only the weights come back."""
    from pytorch_lightning.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    return isinstance(trainer.strategy.launcher, _MultiProcessingLauncher)


class FinalCheckpointInChildren(pl.Callback):
    """ddp_spawn / ddp_fork: save the final checkpoint where the training state lives, in the child processes.

    Their step count and optimizer state never return to the parent (Lightning sends back only the weights),
    so the parent cannot write a resumable checkpoint; `save_final_checkpoint` reads this one back instead.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if fit_runs_in_child_processes(trainer):
            trainer.save_checkpoint(self.path)


def save_final_checkpoint(trainer: pl.Trainer, path: Any) -> None:
    """After `fit`: save the final checkpoint, or (ddp_spawn / ddp_fork) restore the step count from it."""
    if not fit_runs_in_child_processes(trainer):
        # callbacks.checkpoint writes last.ckpt at the end of the final step, the state that resumes exactly;
        # a save after `fit` returns would record the finished loop instead.
        if not Path(path).exists():
            trainer.save_checkpoint(path)
        return
    checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    trainer.fit_loop.load_state_dict(checkpoint["loops"]["fit_loop"])


def fsdp_strategy(wrap: list[str], **kwargs: Any) -> Any:
    """Lightning's FSDPStrategy wrapping the named module classes (see FSDP_WRAP_CLASSES) as FSDP units.

    `use_orig_params=True` lets frozen and trainable (e.g. LoRA) parameters share a unit.
    """
    import importlib

    from pytorch_lightning.strategies import FSDPStrategy

    classes = set()
    for name in wrap:
        module, _, attr = FSDP_WRAP_CLASSES.get(name, name).rpartition(".")
        classes.add(getattr(importlib.import_module(module), attr))
    kwargs.setdefault("use_orig_params", True)
    return FSDPStrategy(auto_wrap_policy=classes, **kwargs)


# ---- validation -----------------------------------------------------------------------------------------


def check_distributed(cfg: DictConfig, report: Callable[[str], None]) -> None:
    """Problems of the parallel layout: FSDP on CPU, SLURM task layout, multi-node rendezvous, LR scaling."""
    trainer = cfg.trainer
    strategy = strategy_name(trainer)
    on_cpu = trainer.accelerator == "cpu" or (trainer.accelerator == "auto" and not torch.cuda.is_available())
    if strategy == "fsdp" and on_cpu:
        report(
            "trainer.strategy: FSDP shards the model across CUDA GPUs (NCCL) and does not run on CPU; "
            "use trainer=ddp (gloo on CPU) or run on GPUs"
        )
    if under_slurm():
        _check_slurm_layout(trainer, strategy, report)
    elif isinstance(trainer.num_nodes, int) and trainer.num_nodes > 1 and not _torchelastic():
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK") if k not in os.environ]
        if missing:
            report(
                f"trainer.num_nodes={trainer.num_nodes} outside SLURM needs {', '.join(missing)} in the "
                "environment of every node (MASTER_ADDR/MASTER_PORT: node 0's address and a free port, "
                "NODE_RANK: 0..num_nodes-1), or torchrun; under SLURM use slurm/multinode.sbatch"
            )
    method = cfg.method
    reference = OmegaConf.select(method, "lr_reference_batch", default=1)
    scale = OmegaConf.select(method, "scale_lr", default=False)
    if scale and (not isinstance(reference, int) or reference < 1):
        report(
            f"method.lr_reference_batch: must be an integer >= 1 with method.scale_lr=true, got {reference!r}"
        )


def _check_slurm_layout(trainer: DictConfig, strategy: str, report: Callable[[str], None]) -> None:
    if strategy in ("ddp_spawn", "ddp_fork"):
        report(
            f"trainer.strategy: {strategy} starts its own processes, but under srun every SLURM task is "
            "already one rank; use trainer=ddp"
        )
    tasks, nodes = slurm_tasks_per_node(), slurm_num_nodes()
    if tasks is not None and isinstance(trainer.devices, int) and trainer.devices != tasks:
        report(
            f"trainer.devices={trainer.devices} but this SLURM job runs {tasks} task(s) per node "
            f"(--ntasks-per-node): Lightning runs one process per task and per device; drop the "
            f"trainer.devices override (it follows SLURM) or submit with --ntasks-per-node={trainer.devices}"
        )
    if nodes is not None and isinstance(trainer.num_nodes, int) and trainer.num_nodes != nodes:
        report(
            f"trainer.num_nodes={trainer.num_nodes} but this SLURM job has {nodes} node(s) (--nodes); drop "
            f"the trainer.num_nodes override (it follows SLURM) or submit with --nodes={trainer.num_nodes}"
        )


def _torchelastic() -> bool:
    return all(k in os.environ for k in ("RANK", "GROUP_RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"))


# ---- batch semantics ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchSemantics:
    """How many samples one optimizer step sees."""

    per_device: int
    devices: int
    num_nodes: int
    accumulation: int

    @property
    def effective(self) -> int:
        return self.per_device * self.devices * self.num_nodes * self.accumulation

    def __str__(self) -> str:
        return (
            f"effective batch {self.effective} = {self.per_device} per device × {self.devices} device(s) "
            f"× {self.num_nodes} node(s) × {self.accumulation} accumulation step(s)"
        )


def batch_semantics(trainer: Any, per_device_batch: int) -> BatchSemantics:
    """The batch layout of a constructed `pl.Trainer`."""
    return BatchSemantics(
        per_device=per_device_batch,
        devices=trainer.num_devices,
        num_nodes=trainer.num_nodes,
        accumulation=trainer.accumulate_grad_batches,
    )


def apply_batch_semantics(cfg: DictConfig, trainer: Any) -> BatchSemantics:
    """Log the effective batch once (rank 0) and, with `method.scale_lr`, scale the learning rates by it.

    Scaling is linear: lr × effective batch / `method.lr_reference_batch` (the batch the lr was tuned for),
    applied to `method.lr` and `method.text_encoder_lr`. Off by default.
    """
    semantics = batch_semantics(trainer, cfg.data.batch_size)
    method = cfg.method
    message = str(semantics)
    if OmegaConf.select(method, "scale_lr", default=False):
        factor = semantics.effective / method.lr_reference_batch
        lr, text_lr = method.lr * factor, method.text_encoder_lr * factor
        with open_dict(method):
            method.lr, method.text_encoder_lr = lr, text_lr
        message += (
            f"; method.scale_lr: lr × {semantics.effective}/{method.lr_reference_batch} → "
            f"lr={lr:g}, text_encoder_lr={text_lr:g}"
        )
    if trainer.is_global_zero:
        log.info(message)
    return semantics
