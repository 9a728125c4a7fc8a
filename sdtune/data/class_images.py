"""DreamBooth class images, generated with the base model before training.

The class folder is topped up to `num_class_images` images named `class_00000.png`, `class_00001.png`, …;
image i always comes from the same seed, each file is written atomically, so a second run reuses the folder
and an interrupted one carries on where it stopped. Under DDP every rank generates the indices
i % world_size == rank, then waits until the folder is complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from sdtune.data.records import IMAGE_SUFFIXES, DataError
from sdtune.io import atomic_path

CLASS_IMAGE = "class_{:05d}.png"
GENERATION_VERSION = 1  # bump when generation changes, so cached class folders are not reused
WAIT_TIMEOUT_S = 3 * 3600.0

Render = Callable[[list[int]], list[Image.Image]]


def list_images(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted (hidden and half-written files excluded)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
    )


def missing_indices(folder: Path, count: int) -> list[int]:
    """The indices i of the `class_{i:05d}.png` files to generate so that `folder` holds `count` images.

    Images already there (generated or not) count; the lowest free indices are filled first, so the answer
    only shrinks as files appear, whichever process writes them.
    """
    existing = list_images(folder)
    names = {p.name for p in existing}
    indices: list[int] = []
    i = 0
    while len(existing) + len(indices) < count:
        if CLASS_IMAGE.format(i) not in names:
            indices.append(i)
        i += 1
    return indices


def process_rank() -> tuple[int, int]:
    """(rank, world size) of this process as its launcher set them (torchrun, srun); (0, 1) alone."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    from lightning_fabric.plugins.environments import SLURMEnvironment

    if SLURMEnvironment.detect():
        slurm = SLURMEnvironment()
        return slurm.global_rank(), slurm.world_size()
    return 0, 1


def ensure_class_images(
    folder: Path,
    count: int,
    render: Render,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    timeout_s: float = WAIT_TIMEOUT_S,
    prepare: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> list[Path]:
    """Generate this rank's share of the missing class images, wait for the rest; returns `count` images.

    `render(indices)` returns one image per index (the same image for the same index, whatever the batch);
    it runs inside `prepare()` (e.g. the models moved to a GPU), entered only when there is work to do.
    """
    from tqdm.auto import tqdm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    todo = [i for i in missing_indices(folder, count) if i % world_size == rank]
    label = "class images" if world_size == 1 else f"class images (rank {rank})"
    if not todo:
        _wait_for(folder, count, timeout_s)
        return list_images(folder)[:count]
    with prepare(), tqdm(total=len(todo), desc=label, unit="img") as bar:
        for start in range(0, len(todo), batch_size):
            indices = todo[start : start + batch_size]
            for index, image in zip(indices, render(indices), strict=True):
                with atomic_path(folder / CLASS_IMAGE.format(index)) as tmp:
                    image.save(tmp, format="PNG")
            bar.update(len(indices))
    _wait_for(folder, count, timeout_s)
    return list_images(folder)[:count]


def _wait_for(folder: Path, count: int, timeout_s: float, poll_s: float = 2.0) -> None:
    """Block until `folder` holds `count` images (the other ranks' shares)."""
    deadline = time.monotonic() + timeout_s
    while (have := len(list_images(folder))) < count:
        if time.monotonic() > deadline:
            raise DataError(
                f"class images: {folder} holds {have} of {count} images after waiting {timeout_s:.0f} s for "
                "the other ranks to generate theirs; did one fail? Rerun to continue where they stopped."
            )
        time.sleep(poll_s)


def default_class_dir(
    cache_dir: Path, base_model: str, prompt: str, resolution: int, generation: Any
) -> Path:
    """The cache folder of class images for this base model, prompt and generation settings."""
    params = {
        "version": GENERATION_VERSION,
        "base_model": base_model,
        "prompt": prompt,
        "resolution": resolution,
        **{k: generation[k] for k in ("scheduler", "steps", "guidance", "negative_prompt", "seed")},
    }
    if generation.get("guidance_rescale"):  # off keeps the folders made before the setting existed
        params["guidance_rescale"] = generation.guidance_rescale
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / "class-images" / key


def model_renderer(stack: Any, conditioning: Any, prompt: str, generation: Any, resolution: int) -> Render:
    """Class images from the base model: index i starts from the noise of seed `generation.seed + i`."""
    from sdtune.sampling import generate, make_scheduler, to_pil

    def render(indices: list[int]) -> list[Image.Image]:
        seeds = [generation.seed + i for i in indices]
        batch = {
            "caption": [prompt] * len(indices),
            "negative_caption": [generation.negative_prompt] * len(indices),
        }
        images = generate(
            stack.unet,
            stack.vae,
            conditioning,
            batch,
            scheduler=make_scheduler(generation.scheduler, stack.scheduler_config, seed=seeds[0]),
            steps=generation.steps,
            guidance=generation.guidance,
            guidance_rescale=generation.get("guidance_rescale", 0.0),
            seed=seeds[0],
            height=resolution,
            width=resolution,
            noise_seeds=seeds,
        )
        return to_pil(images)

    return render


def generation_device(accelerator: str) -> torch.device:
    """This process's GPU when training will use one (as Lightning will pick it), else the CPU."""
    if accelerator not in ("gpu", "cuda", "auto") or not torch.cuda.is_available():
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
    return torch.device("cuda", local % torch.cuda.device_count())


@contextlib.contextmanager
def stack_on(stack: Any, device: torch.device) -> Iterator[None]:
    """Run the block with the stack's models on `device` (16-bit autocast on a GPU); move them back after."""
    parts = (stack.unet, stack.vae, *stack.text_encoders)
    before = [part.device for part in parts]
    for part in parts:
        part.to(device)
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        autocast: Any = torch.autocast("cuda", dtype=dtype)
    else:
        autocast = contextlib.nullcontext()
    try:
        with autocast, torch.no_grad():
            yield
    finally:
        for part, original in zip(parts, before):
            part.to(original)
        if device.type == "cuda":
            torch.cuda.empty_cache()
