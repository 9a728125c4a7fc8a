"""Export trained weights in each format other tools read; used at the end of training and by `sdtune.export`.

Every exporter takes an `ExportContext` (the trained stack and facts about the run) and a destination, writes
atomically, and returns what it wrote (a file or a folder).
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdtune.formats.diffusers import cast_floats, lora_layers, save_diffusers_lora
from sdtune.io import atomic_path
from sdtune.models.adapters import adapter_config


@dataclass
class ExportContext:
    """The trained stack plus what the file formats record about the run."""

    unet: Any
    text_encoder: Any
    vae: Any
    tokenizer: Any
    scheduler: Any
    family: str
    prediction_type: str
    resolution: int
    num_train_images: int
    name: str
    embeddings: dict[str, Any] = field(default_factory=dict)  # textual inversion: placeholder -> rows
    conditioning: Any = None  # the run's ConditioningStack (its trainable parts are saved beside the exports)
    text_encoder_2: Any = None  # SDXL
    tokenizer_2: Any = None
    dtype: torch.dtype | None = None  # the weights' type in the files (export.dtype); None = as trained
    training: dict[str, str] = field(default_factory=dict)  # kohya's ss_* training entries of the run

    @property
    def text_encoders(self) -> dict[str, Any]:
        """The text encoders by their diffusers pipeline names."""
        encoders = {"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}
        return {name: model for name, model in encoders.items() if model is not None}

    @property
    def has_lora(self) -> bool:
        return adapter_config(self.unet) is not None

    @property
    def widened_input(self) -> bool:
        """Whether the U-Net takes concat conditions (more input channels than the VAE's latent)."""
        return self.unet.config.in_channels != self.vae.config.latent_channels


class ExportError(ValueError):
    """The requested export is impossible for this model; the message names what works instead."""


LORA_FORMATS = ("diffusers", "kohya", "peft")


def context_from_module(
    module: Any,
    *,
    name: str,
    resolution: int,
    num_train_images: int,
    dtype: str | None = None,
    training: dict[str, str] | None = None,
) -> ExportContext:
    """The export context of a trained `DiffusionModule`; `dtype` names the files' weight type (None = as
    trained)."""
    from sdtune.models.textual_inversion import learned_embeddings
    from sdtune.perf import DTYPES

    stack = module.stack
    return ExportContext(
        unet=module.unet,
        text_encoder=stack.text_encoder,
        vae=stack.vae,
        tokenizer=stack.tokenizer,
        scheduler=stack.noise_scheduler,
        family=stack.family,
        prediction_type=module.prediction_type,
        resolution=resolution,
        num_train_images=num_train_images,
        name=name,
        embeddings=learned_embeddings(stack),
        conditioning=module.conditioning,
        text_encoder_2=stack.text_encoder_2,
        tokenizer_2=stack.tokenizer_2,
        dtype=DTYPES[dtype] if dtype is not None else None,
        training=dict(training or {}),
    )


def _require_lora(ctx: ExportContext, fmt: str) -> None:
    if not ctx.has_lora:
        raise ExportError(
            f"format={fmt} exports a LoRA, but this model has no LoRA adapter; "
            "use format=merged or format=single_file for a full model"
        )
    adapter_markers = ("lora_", "hada_", "lokr_")
    trained = [
        n
        for n, p in ctx.unet.named_parameters()
        if p.requires_grad and not any(m in n for m in adapter_markers)
    ]
    if trained:
        raise ExportError(
            f"format={fmt} holds only LoRA weights, but this model needs its new input weights too: the "
            f"U-Net takes {ctx.unet.config.in_channels} input channels (latent + concat conditions such as a "
            f"semantic map) and trained {', '.join(sorted({n.rsplit('.', 1)[0] for n in trained}))} with the "
            "LoRA; use format=merged (a full diffusers pipeline)"
        )


def _variant(ctx: ExportContext) -> str:
    config = adapter_config(ctx.unet)
    kind = type(config).__name__
    if kind == "LoHaConfig":
        return "loha"
    if kind == "LoKrConfig":
        return "lokr"
    return "dora" if getattr(config, "use_dora", False) else "lora"


def export_diffusers(ctx: ExportContext, out: Path) -> Path:
    """diffusers LoRA (`load_lora_weights`), alpha kept in the adapter metadata; `out` is a folder."""
    _require_lora(ctx, "diffusers")
    if _variant(ctx) in ("loha", "lokr"):
        raise ExportError(
            f"diffusers cannot load {_variant(ctx)} adapters; use format=peft, "
            "format=kohya (LyCORIS keys), format=merged or format=single_file"
        )
    return save_diffusers_lora(out, ctx.unet, ctx.text_encoders, sdxl=ctx.family == "sdxl", dtype=ctx.dtype)


def export_kohya(ctx: ExportContext, out: Path) -> Path:
    """kohya / A1111 / ComfyUI LoRA file with sd-scripts' metadata; `out` is a `.safetensors` file."""
    from sdtune.formats.kohya import peft_to_kohya
    from sdtune.formats.kohya_file import SDXL_VERSION, kohya_metadata, save_kohya

    _require_lora(ctx, "kohya")
    variant = _variant(ctx)
    if variant == "dora":
        raise ExportError(
            "DoRA has no kohya form (readers drop dora_scale); use format=diffusers, format=peft, "
            "format=merged or format=single_file"
        )
    if variant in ("loha", "lokr"):
        if ctx.family == "sdxl":
            raise ExportError(f"kohya export of SDXL {variant} is not supported yet; use format=peft")
        return _export_lycoris(ctx, Path(out))
    unet_config = adapter_config(ctx.unet)
    encoders = {
        name: (lora_layers(model, ctx.dtype), adapter_config(model))
        for name, model in ctx.text_encoders.items()
    }
    te, te_config = encoders["text_encoder"]
    te_2, te_2_config = encoders.get("text_encoder_2", (None, None))
    state = peft_to_kohya(
        lora_layers(ctx.unet, ctx.dtype),
        unet_config,
        te,
        te_config,
        family=ctx.family,
        text_encoder_2_lora=te_2,
        text_encoder_2_config=te_2_config,
        unet_layout=ctx.unet.config,
    )
    v_pred = ctx.prediction_type == "v_prediction"
    version = {"sd1": "sd_v1", "sdxl": SDXL_VERSION}.get(ctx.family, "sd_v2_v" if v_pred else "sd_v2")
    scale_alpha = unet_config.lora_alpha * (unet_config.r**0.5 if unet_config.use_rslora else 1)
    metadata = kohya_metadata(
        base_model_version=version,
        v2=ctx.family == "sd2",
        rank=unet_config.r,
        alpha=float(next(t for k, t in state.items() if k.endswith(".alpha"))),
        network_args={"use_rslora": str(unet_config.use_rslora)} if unet_config.use_rslora else None,
        output_name=ctx.name,
        resolution=(ctx.resolution, ctx.resolution),
        num_train_images=ctx.num_train_images,
        prediction_type=ctx.prediction_type,
        title=ctx.name,
        extra={
            **ctx.training,
            "ss_training_alpha": str(scale_alpha),
            "ss_clip_skip": str(_text_setting(ctx, "clip_skip")),
            "ss_max_token_length": str(_text_setting(ctx, "max_token_length")),
        },
    )
    out = Path(out)
    save_kohya(out, cast_floats(state, ctx.dtype), metadata)
    return out


def _text_setting(ctx: ExportContext, name: str) -> int | None:
    """A setting of the run's text conditioning, for kohya's metadata; None without text."""
    components = ctx.conditioning.components if ctx.conditioning is not None else {}
    return getattr(components["text"], name, None) if "text" in components else None


def _export_lycoris(ctx: ExportContext, out: Path) -> Path:
    from sdtune.formats.kohya_file import kohya_metadata, save_kohya
    from sdtune.formats.lycoris import peft_to_lycoris

    unet_config, te_config = adapter_config(ctx.unet), adapter_config(ctx.text_encoder)
    state = peft_to_lycoris(
        lora_layers(ctx.unet, ctx.dtype),
        unet_config,
        lora_layers(ctx.text_encoder, ctx.dtype) if te_config else None,
        te_config,
    )
    metadata = kohya_metadata(
        base_model_version="sd_v1" if ctx.family == "sd1" else "sd_v2",
        v2=ctx.family == "sd2",
        rank=unet_config.r,
        alpha=float(unet_config.alpha),
        network_args={"algo": _variant(ctx)},
        output_name=ctx.name,
        resolution=(ctx.resolution, ctx.resolution),
        num_train_images=ctx.num_train_images,
        prediction_type=ctx.prediction_type,
        title=ctx.name,
        extra={**ctx.training, "ss_network_module": "lycoris.kohya"},
    )
    save_kohya(out, cast_floats(state, ctx.dtype), metadata)
    return out


def export_peft(ctx: ExportContext, out: Path) -> Path:
    """peft adapters (`PeftModel.from_pretrained`): `out/unet/` and, if trained, `out/text_encoder/` (and
    SDXL's `out/text_encoder_2/`)."""
    from safetensors.torch import save_file

    _require_lora(ctx, "peft")
    with atomic_path(Path(out)) as tmp:
        for part, model in {"unet": ctx.unet, **ctx.text_encoders}.items():
            config = adapter_config(model)
            if config is None:
                continue
            folder = tmp / part
            config.save_pretrained(str(folder))
            # PeftModel.save_pretrained's key layout: relative to the PeftModel wrapper.
            tensors = {
                f"base_model.model.{k}": v.detach().cpu().contiguous()
                for k, v in lora_layers(model, ctx.dtype).items()
            }
            save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return Path(out)


def merged_models(ctx: ExportContext) -> tuple[Any, Any]:
    """Copies of the U-Net and text encoder with their LoRA merged into the base weights (or as they are),
    in the export's dtype."""
    return _merged(ctx.unet, ctx.dtype), _merged(ctx.text_encoder, ctx.dtype)


def _in_dtype(model: Any, dtype: torch.dtype | None) -> Any:
    """A copy of `model` in `dtype`; `model` itself when there is nothing to change."""
    return model if dtype is None else copy.deepcopy(model).to(dtype)


def _merged(model: Any, dtype: torch.dtype | None = None) -> Any:
    from diffusers.utils.peft_utils import recurse_remove_peft_layers
    from peft.tuners.tuners_utils import BaseTunerLayer

    if adapter_config(model) is None:
        return _in_dtype(model, dtype)
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    model = recurse_remove_peft_layers(model)
    for attribute in ("peft_config", "_hf_peft_config_loaded"):
        if attribute in vars(model):
            delattr(model, attribute)
    return model if dtype is None else model.to(dtype)


def export_merged(ctx: ExportContext, out: Path) -> Path:
    """A full diffusers pipeline folder (`from_pretrained`) with the LoRA merged into the base."""
    from sdtune.models.loading import assemble_pipeline

    unet, text_encoder = merged_models(ctx)
    pipe = assemble_pipeline(
        vae=_in_dtype(ctx.vae, ctx.dtype),
        unet=unet,
        text_encoder=text_encoder,
        tokenizer=ctx.tokenizer,
        scheduler=ctx.scheduler,
        text_encoder_2=_merged(ctx.text_encoder_2, ctx.dtype) if ctx.family == "sdxl" else None,
        tokenizer_2=ctx.tokenizer_2,
    )
    with atomic_path(Path(out)) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return Path(out)


def export_single_file(ctx: ExportContext, out: Path) -> Path:
    """One original-layout `.safetensors` checkpoint (A1111/ComfyUI), LoRA merged."""
    from sdtune.formats.single_file import save_single_file

    if ctx.widened_input:
        raise ExportError(
            f"single-file export of a U-Net with {ctx.unet.config.in_channels} input channels (concat "
            "conditioning) is not supported: single-file loaders build a standard U-Net; use format=merged"
        )
    unet, text_encoder = merged_models(ctx)
    metadata = {
        "modelspec.title": ctx.name,
        "modelspec.date": dt.date.today().isoformat(),
        "modelspec.prediction_type": "v" if ctx.prediction_type == "v_prediction" else "epsilon",
        "sdtune": json.dumps({"resolution": ctx.resolution}),
    }
    text_encoder_2 = _merged(ctx.text_encoder_2, ctx.dtype) if ctx.text_encoder_2 is not None else None
    return save_single_file(
        Path(out),
        unet,
        _in_dtype(ctx.vae, ctx.dtype),
        text_encoder,
        metadata=metadata,
        family=ctx.family,
        text_encoder_2=text_encoder_2,
    )


def _require_embeddings(ctx: ExportContext, fmt: str) -> None:
    if not ctx.embeddings:
        raise ExportError(f"format={fmt} exports textual-inversion embeddings, but this model learned none")


def export_embedding(ctx: ExportContext, out: Path) -> Path:
    """diffusers `learned_embeds.safetensors` ({placeholder: (vectors, dim)}); `out` is a file."""
    from safetensors.torch import save_file

    _require_embeddings(ctx, "embedding")
    with atomic_path(Path(out)) as tmp:
        rows = cast_floats(ctx.embeddings, ctx.dtype)
        save_file({k: v.contiguous() for k, v in rows.items()}, str(tmp), metadata={"format": "pt"})
    return Path(out)


def export_a1111_embedding(ctx: ExportContext, out: Path) -> Path:
    """A1111 embedding (`emb_params`), one file per placeholder, named after it; `out` is a folder."""
    from safetensors.torch import save_file

    _require_embeddings(ctx, "a1111_embedding")
    Path(out).mkdir(parents=True, exist_ok=True)
    written = Path(out)
    for placeholder, rows in cast_floats(ctx.embeddings, ctx.dtype).items():
        name = "".join(ch for ch in placeholder if ch.isalnum() or ch in "-_") or "embedding"
        written = Path(out) / f"{name}.safetensors"
        with atomic_path(written) as tmp:
            save_file({"emb_params": rows.contiguous()}, str(tmp), metadata={"name": placeholder})
    return written


EXPORTERS: dict[str, Callable[[ExportContext, Path], Path]] = {
    "diffusers": export_diffusers,
    "kohya": export_kohya,
    "peft": export_peft,
    "merged": export_merged,
    "pipeline": export_merged,  # the name full fine-tuning users expect; the same full pipeline
    "single_file": export_single_file,
    "embedding": export_embedding,
    "a1111_embedding": export_a1111_embedding,
}

# Where each format lands inside a run directory at the end of training.
RUN_PATHS = {
    "diffusers": "lora",
    "kohya": "lora/kohya.safetensors",
    "peft": "lora/peft",
    "merged": "pipeline",
    "pipeline": "pipeline",
    "single_file": "model.safetensors",
    "embedding": "embeddings/learned_embeds.safetensors",
    "a1111_embedding": "embeddings",
}


# Formats as small as the trained adapter or embeddings: cheap to write once before training.
REHEARSED = ("diffusers", "kohya", "peft", "embedding", "a1111_embedding")


def rehearse_exports(ctx: ExportContext, formats: list[str]) -> list[str]:
    """Write each adapter-sized format to a scratch folder before training; what cannot be exported (say, a
    LoRA target that has no kohya key) comes back as a message naming the format, not after the training.

    Full-model formats (merged, pipeline, single_file) are not rehearsed: writing them costs a model's size.
    """
    problems = []
    with tempfile.TemporaryDirectory(prefix="sdtune-export-check-") as scratch:
        for fmt in formats:
            if fmt not in REHEARSED:
                continue
            try:
                EXPORTERS[fmt](ctx, Path(scratch) / RUN_PATHS[fmt])
            except ValueError as error:  # ExportError and the converters' key errors
                problems.append(
                    f"export.formats: {fmt} cannot hold what this run trains ({error}); remove {fmt} from "
                    "export.formats or change what trains"
                )
    return problems


def export_run(ctx: ExportContext, run_dir: Path, formats: list[str]) -> list[dict[str, str]]:
    """Write each format under `run_dir`; returns manifest entries (format, path relative to the run).

    Trainable conditioning weights (e.g. a representation projection) belong to no diffusers format: they are
    written to `conditioning.safetensors` (manifest format `conditioning`), which `sdtune.sample` loads.
    """
    entries = []
    for fmt in formats:
        written = EXPORTERS[fmt](ctx, run_dir / RUN_PATHS[fmt])
        entries.append({"format": fmt, "path": str(written.relative_to(run_dir))})
    own = conditioning_weights(ctx) if ctx.conditioning is not None else {}
    if own:
        written = save_conditioning(own, run_dir / CONDITIONING_WEIGHTS)
        entries.append({"format": "conditioning", "path": str(written.relative_to(run_dir))})
    return entries


CONDITIONING_WEIGHTS = "conditioning.safetensors"


def conditioning_weights(ctx: ExportContext) -> dict[str, Any]:
    """The trainable tensors of the run's conditioning that belong to none of the stack's models (e.g. a
    representation projection), keyed relative to the ConditioningStack."""
    models = (ctx.unet, ctx.vae, *ctx.text_encoders.values())
    owned = {id(p) for model in models for p in model.parameters()}
    return {
        name: p.detach().cpu().contiguous()
        for name, p in ctx.conditioning.named_parameters()
        if p.requires_grad and id(p) not in owned
    }


def save_conditioning(tensors: dict[str, Any], out: Path) -> Path:
    """Write conditioning weights as a safetensors file."""
    from safetensors.torch import save_file

    with atomic_path(Path(out)) as tmp:
        save_file(tensors, str(tmp))
    return Path(out)
