"""Reference-model metrics for real models: CLIP score and FID through torchmetrics.

Nothing is downloaded. The CLIP model is one the user already has: a local folder, or a hub id already in the
Hugging Face cache. FID compares the generated set with a folder of reference images, in the feature space of
that CLIP model's image encoder (FID_CLIP; Kynkäänniemi et al. 2023 found it tracks human judgement better
than ImageNet features) or, with torch-fidelity installed and its weights file given, of the classic
InceptionV3 (`fid_features=inception`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image

from sdtune.data.records import IMAGE_SUFFIXES

FID_FEATURES = ("clip", "inception")
BATCH = 32


def resolve_clip(name: str) -> str | None:
    """A folder or cached hub id that `from_pretrained(local_files_only=True)` loads; None if absent."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        return str(folder) if (folder / "config.json").is_file() else None
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        return None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json")
    return name if isinstance(cached, str) else None


def reference_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def metric_problems(metrics: DictConfig) -> list[str]:
    """Everything wrong with the `metrics.*` settings, found before any model is loaded."""
    problems = []
    if metrics.clip_model is not None and resolve_clip(str(metrics.clip_model)) is None:
        problems.append(
            f"metrics.clip_model: {metrics.clip_model!r} is neither a local folder holding a CLIP model "
            "(config.json) nor a hub id in the Hugging Face cache; nothing is downloaded: fetch it where the "
            "hub is reachable (`hf download ID --local-dir DIR`) and pass that folder"
        )
    if metrics.fid_reference is None:
        return problems
    folder = Path(str(metrics.fid_reference)).expanduser()
    found = reference_images(folder) if folder.is_dir() else []
    if len(found) < 2:
        problems.append(
            f"metrics.fid_reference: {folder} holds {len(found)} image(s) ({', '.join(IMAGE_SUFFIXES)}); FID "
            "needs a folder of at least 2 reference images (thousands for a stable figure)"
        )
    unreadable = [str(path) for path in found if not _readable(path)]
    if unreadable:
        problems.append(
            f"metrics.fid_reference: {len(unreadable)} unreadable image(s), remove or replace them: "
            + ", ".join(unreadable)
        )
    if metrics.fid_features not in FID_FEATURES:
        problems.append(f"metrics.fid_features: {metrics.fid_features!r}; valid: {', '.join(FID_FEATURES)}")
    elif metrics.fid_features == "clip" and metrics.clip_model is None:
        problems.append("metrics.fid_features=clip compares CLIP image embeddings: set metrics.clip_model")
    elif metrics.fid_features == "inception":
        if importlib.util.find_spec("torch_fidelity") is None:
            problems.append(
                "metrics.fid_features=inception needs torch-fidelity (pip install torch-fidelity); "
                "or use fid_features=clip"
            )
        weights = metrics.fid_inception_weights
        if weights is None or not Path(str(weights)).expanduser().is_file():
            problems.append(
                f"metrics.fid_inception_weights: {weights!r} is not a file; give the local path of "
                "torch-fidelity's pt_inception-2015-12-05-6726825d.pth (nothing is downloaded)"
            )
    return problems


def _readable(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception:  # PIL raises many kinds of errors for truncated or foreign files
        return False
    return True


def load_clip(name: str) -> tuple[Any, Any]:
    from transformers import CLIPModel, CLIPProcessor

    source = resolve_clip(name)
    if source is None:
        raise FileNotFoundError(f"CLIP model {name!r} is not on this machine (see metric_problems)")
    model = CLIPModel.from_pretrained(source, local_files_only=True).eval()
    return model, CLIPProcessor.from_pretrained(source, local_files_only=True)


def as_uint8(images: list[Image.Image]) -> torch.Tensor:
    """(N, 3, H, W) uint8, the layout torchmetrics' image metrics take."""
    arrays = [np.asarray(image.convert("RGB"), dtype=np.uint8) for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _tensor(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers 5: a model output


class _Embeddings(torch.nn.Module):
    """A CLIPModel whose get_*_features return tensors, as torchmetrics expects (transformers 5 returns
    model outputs)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _tensor(self.model.get_text_features(*args, **kwargs))


def clip_score(images: list[Image.Image], texts: list[str], clip: tuple[Any, Any]) -> float:
    """torchmetrics' CLIP score: mean over images of max(100 · cos(image embedding, text embedding), 0)."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    model, processor = clip
    metric = CLIPScore(model_name_or_path=lambda: (_Embeddings(model), processor))
    for start in range(0, len(images), BATCH):
        metric.update(as_uint8(images[start : start + BATCH]), texts[start : start + BATCH])
    return float(metric.compute())


class ClipImageFeatures(torch.nn.Module):
    """A CLIP image encoder as torchmetrics' FID feature extractor: uint8 images in, image embeddings out."""

    def __init__(self, clip: tuple[Any, Any]) -> None:
        super().__init__()
        self.model, self.processor = clip
        self.num_features = int(self.model.config.projection_dim)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = self.processor(images=list(images.permute(0, 2, 3, 1).numpy()), return_tensors="pt")
        return _tensor(self.model.get_image_features(pixel_values=pixels["pixel_values"]))


def load_reference(folder: Path, resolution: int) -> list[Image.Image]:
    """The reference images as training sees them: upright, RGB, resized, centre-cropped square."""
    from sdtune.data.transforms import ImageTransform
    from sdtune.sampling import to_pil

    transform = ImageTransform(resolution)
    images = []
    for path in reference_images(folder):
        with Image.open(path) as opened:
            images.append(transform(opened))
    return to_pil((torch.stack(images) + 1) / 2)


def fid(generated: list[Image.Image], reference: list[Image.Image], feature: Any) -> float:
    """torchmetrics' Fréchet distance between the two sets' features (`feature`: the extractor module)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=feature)  # its feature sums and covariances are float64
    for real, images in ((True, reference), (False, generated)):
        for start in range(0, len(images), BATCH):
            metric.update(as_uint8(images[start : start + BATCH]), real=real)
    return float(metric.compute())


def compute_metrics(
    metrics: DictConfig, images: list[Image.Image], texts: list[str], resolution: int
) -> dict[str, Any]:
    """The `metrics.*` that are set, as a report section (empty when none are)."""
    out: dict[str, Any] = {}
    clip = load_clip(str(metrics.clip_model)) if metrics.clip_model is not None else None
    if clip is not None:
        out["clip_score"] = {
            "mean": clip_score(images, texts, clip),
            "n": len(images),
            "model": str(metrics.clip_model),
        }
    if metrics.fid_reference is not None:
        reference = load_reference(Path(str(metrics.fid_reference)).expanduser(), resolution)
        if metrics.fid_features == "clip":
            feature: Any = ClipImageFeatures(clip)
        else:
            feature = _inception(str(metrics.fid_inception_weights))
        out["fid"] = {
            "value": fid(images, reference, feature),
            "features": str(metrics.fid_features),
            "n_generated": len(images),
            "n_reference": len(reference),
        }
    return out


def _inception(weights: str) -> Any:
    from torchmetrics.image.fid import NoTrainInceptionV3

    return NoTrainInceptionV3(
        name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=weights
    )
