"""Generate a fixed prompt set with fixed seeds and score it with the shapes-world judge.

Used by `python -m sdtune.evaluate` (a run directory or a base model) and by `EvaluateCallback` (the model
being trained). A prompt set is a list of `Prompt`s: the text, and what the judge should read off its images
(any of shape, colour, background; what is left out is not scored, but its distribution is still reported).
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf
from PIL import Image

from sdtune.data.shapes import BACKGROUNDS, COLOURS, SHAPES, ShapeSpec, caption, render, sample_spec
from sdtune.judge import Judge, Verdict, foreground, image_array

FIELDS = ("shape", "colour", "background")
SCHEMA_VERSION = 1
GRID_COLUMNS = 12


@dataclass(frozen=True)
class Prompt:
    text: str
    shape: str | None = None
    colour: str | None = None
    background: str | None = None
    layout: ShapeSpec | None = field(default=None, compare=False)  # map-conditioned: the map to draw in

    def expected(self) -> dict[str, str]:
        return {f: getattr(self, f) for f in FIELDS if getattr(self, f) is not None}


def grid_prompts(
    template: str,
    shapes: list[str] | None = None,
    colours: list[str] | None = None,
    backgrounds: list[str] | None = None,
) -> list[Prompt]:
    """Every combination the template names, e.g. "a {colour} {shape} on a {background} background"."""
    choices = {
        "shape": list(shapes or SHAPES),
        "colour": list(colours or COLOURS),
        "background": list(backgrounds or BACKGROUNDS),
    }
    used = [f for f in FIELDS if "{" + f + "}" in template]
    prompts = []
    for values in itertools.product(*(choices[f] for f in used)):
        named = dict(zip(used, values))
        prompts.append(Prompt(template.format(**named), **named))
    return prompts


def prompts_from_config(cfg: DictConfig) -> list[Prompt]:
    """`cfg.prompts`: a template string expanded over cfg.shapes/colours/backgrounds, or explicit entries."""
    if isinstance(cfg.prompts, ListConfig):
        entries = OmegaConf.to_container(cfg.prompts, resolve=True)
        return [Prompt(e) if isinstance(e, str) else Prompt(**e) for e in entries]
    return grid_prompts(str(cfg.prompts), cfg.get("shapes"), cfg.get("colours"), cfg.get("backgrounds"))


def with_layouts(prompts: list[Prompt], seed: int) -> list[Prompt]:
    """For a map-conditioned model: each prompt with a random layout of its shape (a map to fill) and the
    caption of that layout; shape, colour and background left open in the prompt are drawn too."""
    placed = []
    for index, prompt in enumerate(prompts):
        rng = np.random.default_rng([seed, index, 11])
        spec = sample_spec(
            rng,
            [prompt.shape] if prompt.shape else SHAPES,
            [prompt.colour] if prompt.colour else tuple(COLOURS),
            [prompt.background] if prompt.background else tuple(BACKGROUNDS),
        )
        placed.append(Prompt(caption(spec), spec.shape, spec.colour, spec.background, layout=spec))
    return placed


def unscorable_inputs(conditioning: DictConfig) -> list[tuple[str, str]]:
    """(component, input) of each condition a prompt set cannot supply: the evaluation generates from text
    (and from the semantic maps it draws itself)."""
    from hydra.utils import get_class

    found = []
    for name, component in conditioning.items():
        needed = getattr(get_class(component._target_), "input", None)
        if needed not in (None, "map"):
            found.append((name, needed))
    return found


def map_component(conditioning: Any) -> Any:
    """The conditioning component that takes a label map, if any."""
    return next((c for c in conditioning.components.values() if getattr(c, "input", None) == "map"), None)


def layout_map(spec: ShapeSpec, resolution: int) -> np.ndarray:
    return render(spec, resolution)[1]


def foreground_iou(image: Image.Image, label_map: np.ndarray) -> float:
    """IoU of the judge's foreground (pixels far from the background) and the map's labelled pixels."""
    drawn = foreground(image_array(image))[1]
    wanted = label_map > 0
    union = np.logical_or(drawn, wanted).sum()
    return float(np.logical_and(drawn, wanted).sum() / union) if union else 1.0


def check_prompts(prompts: list[Prompt]) -> list[str]:
    """Problems with expected values the judge cannot read (a typo would score 0% silently): one line per
    unknown value, however many prompts of a template carry it."""
    known = {"shape": SHAPES, "colour": tuple(COLOURS), "background": tuple(BACKGROUNDS)}
    unknown: dict[tuple[str, str], list[str]] = {}
    for prompt in prompts:
        for name, value in prompt.expected().items():
            if value not in known[name]:
                unknown.setdefault((name, value), []).append(prompt.text)
    problems = []
    for (name, value), texts in unknown.items():
        where = repr(texts[0]) if len(texts) == 1 else f"{len(texts)} prompts, e.g. {texts[0]!r}"
        problems.append(f"prompts: {name} {value!r} ({where}) is not one of {list(known[name])}")
    return problems


def generate_set(
    unet: Any,
    vae: Any,
    conditioning: Any,
    scheduler_config: dict[str, Any],
    prompts: list[Prompt],
    settings: DictConfig,
    resolution: int,
) -> list[tuple[Prompt, int, Image.Image]]:
    """(prompt, seed, image) for `settings.per_prompt` seeds of every prompt, in batches."""
    import torch

    from sdtune.sampling import generate, make_scheduler, to_pil

    jobs = [(p, settings.seed + i) for p in prompts for i in range(settings.per_prompt)]
    maps = map_component(conditioning)
    results = []
    for start in range(0, len(jobs), settings.batch_size):
        chunk = jobs[start : start + settings.batch_size]
        batch: dict[str, Any] = {"caption": [p.text for p, _ in chunk], "negative_caption": [""] * len(chunk)}
        if maps is not None:
            labels = [torch.from_numpy(layout_map(p.layout, resolution)).long() for p, _ in chunk]
            batch[maps.key] = torch.stack(labels).to(unet.device)
        with torch.no_grad():
            images = generate(
                unet,
                vae,
                conditioning,
                batch,
                scheduler=make_scheduler(settings.scheduler, scheduler_config, seed=settings.seed),
                steps=settings.steps,
                guidance=settings.guidance,
                seed=settings.seed,
                height=resolution,
                width=resolution,
                noise_seeds=[seed for _, seed in chunk],
                condition_guidance=settings.get("condition_guidance"),
                guidance_rescale=settings.get("guidance_rescale", 0.0),
            )
        results += [(p, seed, image) for (p, seed), image in zip(chunk, to_pil(images))]
    return results


def _condition_guidance(settings: DictConfig) -> dict[str, Any]:
    scales = settings.get("condition_guidance")
    return {"condition_guidance": OmegaConf.to_container(scales)} if scales else {}


def score(samples: list[tuple[Prompt, int, Verdict]]) -> dict[str, Any]:
    """Accuracies overall and per prompted shape, plus the distribution of what was drawn."""

    def accuracy(rows: list[tuple[Prompt, int, Verdict]]) -> dict[str, Any]:
        result: dict[str, Any] = {"n": len(rows)}
        for name in FIELDS:
            scored = [getattr(v, name) == p.expected()[name] for p, _, v in rows if name in p.expected()]
            result[name] = float(np.mean(scored)) if scored else None
        exact = [all(getattr(v, f) == e for f, e in p.expected().items()) for p, _, v in rows]
        result["all"] = float(np.mean(exact)) if exact else None
        return result

    by_shape: dict[str, list[tuple[Prompt, int, Verdict]]] = {}
    for row in samples:
        by_shape.setdefault(row[0].shape or "unspecified", []).append(row)
    return {
        "overall": accuracy(samples),
        "per_shape": {shape: accuracy(rows) for shape, rows in sorted(by_shape.items())},
        "drawn": {field: distribution([getattr(v, field) for _, _, v in samples]) for field in FIELDS},
    }


def distribution(values: list[str]) -> dict[str, float]:
    counts = Counter(values)
    return {k: counts[k] / len(values) for k in sorted(counts)}


def total_variation(p: dict[str, float], q: dict[str, float]) -> float:
    """½ Σ |p − q| over the union of outcomes."""
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))


def evaluate(
    unet: Any,
    vae: Any,
    conditioning: Any,
    scheduler_config: dict[str, Any],
    settings: DictConfig,
    resolution: int,
    judge: Judge | None = None,
) -> tuple[dict[str, Any], list[Image.Image]]:
    """(report, images): generate `settings`' prompt set and score it."""
    judge = judge or Judge.load()
    prompts = prompts_from_config(settings)
    if map_component(conditioning) is not None:
        prompts = with_layouts(prompts, settings.seed)
    generated = generate_set(unet, vae, conditioning, scheduler_config, prompts, settings, resolution)
    verdicts = judge([image for _, _, image in generated])
    rows = [(p, seed, v) for (p, seed, _), v in zip(generated, verdicts)]
    report = {
        "schema": SCHEMA_VERSION,
        "settings": {
            k: settings[k]
            for k in ("scheduler", "steps", "guidance", "guidance_rescale", "seed", "per_prompt")
            if k in settings
        }
        | _condition_guidance(settings),
        "resolution": resolution,
        **score(rows),
        "samples": [
            {"prompt": p.text, "seed": seed, "expected": p.expected(), "judged": v.as_dict()}
            for p, seed, v in rows
        ],
    }
    if map_component(conditioning) is not None:
        ious = [foreground_iou(image, layout_map(p.layout, resolution)) for p, _, image in generated]
        report["map_iou"] = {"mean": float(np.mean(ious)), "n": len(ious)}
        for sample, iou in zip(report["samples"], ious):
            sample["map_iou"] = iou
    return report, [image for _, _, image in generated]


def write_report(report: dict[str, Any], images: list[Image.Image], out_dir: Path, stem: str) -> Path:
    """`<stem>.json` and `<stem>.png` (the images in prompt order) in `out_dir`, written atomically."""
    from sdtune.io import atomic_path, atomic_write_text
    from sdtune.sampling import make_grid

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}.json"
    atomic_write_text(path, json.dumps(report, indent=1) + "\n")
    with atomic_path(out_dir / f"{stem}.png") as tmp:
        make_grid(images, columns=min(GRID_COLUMNS, len(images))).save(tmp, format="PNG")
    return path


def summary_line(report: dict[str, Any]) -> str:
    overall = report["overall"]
    parts = [f"{f} {overall[f]:.1%}" for f in (*FIELDS, "all") if overall.get(f) is not None]
    if "map_iou" in report:
        parts.append(f"map IoU {report['map_iou']['mean']:.3f}")
    metrics = report.get("metrics", {})
    if "clip_score" in metrics:
        parts.append(f"CLIP score {metrics['clip_score']['mean']:.2f}")
    if "fid" in metrics:
        parts.append(f"FID ({metrics['fid']['features']}) {metrics['fid']['value']:.2f}")
    return f"n={overall['n']}: " + ", ".join(parts)
