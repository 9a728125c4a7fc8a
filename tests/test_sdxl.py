"""SDXL on the embedded tiny_xl stack: training end to end, micro-conditioning from the data crop, exports
loaded by diffusers' own SDXL loader, and sampling from a run."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders import StableDiffusionXLLoraLoaderMixin
from PIL import Image
from safetensors import safe_open

from sdtune.data.buckets import fit_image_placed
from sdtune.data.transforms import ImageTransform
from sdtune.formats.kohya import sgm_unet_path
from sdtune.models.tiny_xl import POOLED_DIM, UNET_XL_CONFIG, ensure_tiny_xl_pipeline
from sdtune.sample import sample
from sdtune.train import train

from .conftest import compose_config
from .test_formats_kohya import LOADER_FAILURES, loader_messages

FORMATS = ["diffusers", "kohya", "peft", "merged", "single_file"]
UNET_TARGETS = "[to_q,to_k,to_v,to_out.0,proj_in,ff.net.2,conv1]"
FAST = [
    "+experiment=lora",
    "model=tiny_xl",
    "trainer.max_steps=2",
    "data.batch_size=2",
    "sampling.every_n_steps=0",
    "sampling.steps=2",
    "sampling.per_prompt=1",
    "logger=none",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache_dir):
    run_dir = tmp_path_factory.mktemp("sdxl") / "run"
    cfg = compose_config(
        "train",
        [
            *FAST,
            "data.num_images=4",
            "method.rank=4",
            "method.alpha=2",
            "method.lr=1e-2",
            "method.train_text_encoder=true",
            f"method.target_modules={UNET_TARGETS}",
            f"export.formats=[{','.join(FORMATS)}]",
        ],
        run_dir,
    )
    result = train(cfg)
    result.module.eval()
    return result


@pytest.fixture(scope="module")
def tiny_xl_dir(cache_dir: Path) -> Path:
    return ensure_tiny_xl_pipeline(cache_dir)


def fixed_inputs(unet, text_encoder) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "latents": torch.randn(2, 4, 8, 8, generator=generator),
        "ids": torch.randint(0, text_encoder.config.vocab_size, (2, 77), generator=generator),
        "hidden": torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator),
        "pooled": torch.randn(2, POOLED_DIM, generator=generator),
        "time_ids": torch.tensor([[96.0, 64, 0, 16, 64, 64], [64, 64, 0, 0, 64, 64]]),
    }


@torch.no_grad()
def outputs(unet, text_encoder, text_encoder_2) -> list[torch.Tensor]:
    """U-Net prediction (with SDXL's added conditions) and both encoders' outputs on fixed inputs."""
    x = fixed_inputs(unet, text_encoder)
    added = {"text_embeds": x["pooled"], "time_ids": x["time_ids"]}
    pred = unet(x["latents"], torch.tensor([100, 700]), x["hidden"], added_cond_kwargs=added).sample
    return [pred, text_encoder(x["ids"])[0], text_encoder_2(x["ids"])[0]]


@pytest.fixture(scope="module")
def trained(run):
    stack = run.module.stack
    return outputs(stack.unet, stack.text_encoder, stack.text_encoder_2)


@pytest.fixture(scope="module")
def base(tiny_xl_dir):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_xl_dir)
    return outputs(pipe.unet, pipe.text_encoder, pipe.text_encoder_2)


def assert_reproduces(got: list[torch.Tensor], want: list[torch.Tensor], base: list[torch.Tensor]) -> None:
    for g, w, b in zip(got, want, base):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
        assert (g - b).abs().max() > 1e-3, "the export has no effect"


def test_run_writes_every_export_and_a_sample(run) -> None:
    manifest = json.loads((run.run_dir / "manifest.json").read_text())
    assert [e["format"] for e in manifest["exports"]] == FORMATS
    assert sorted(p.name for p in (run.run_dir / "lora" / "peft").iterdir()) == [
        "text_encoder",
        "text_encoder_2",
        "unet",
    ]
    assert list((run.run_dir / "samples").glob("step_*.png"))


def test_every_trainable_weight_gets_a_gradient(run) -> None:
    """DDP (find_unused_parameters=false) needs it: text_encoder's last layer feeds nothing in SDXL."""
    module = run.module
    batch = next(iter(run.trainer.datamodule.train_dataloader()))
    module.train()
    try:
        module.batch_loss(batch)[0].backward()
        trainable = module.trainable_parameters()
        assert any(".text_encoder_2." in name for name in trainable)
        assert [name for name, p in trainable.items() if p.grad is None] == []
    finally:
        module.zero_grad(set_to_none=True)
        module.eval()


@pytest.mark.parametrize("path", ["lora/pytorch_lora_weights.safetensors", "lora/kohya.safetensors"])
def test_lora_files_load_with_diffusers_sdxl_loader(run, trained, base, tiny_xl_dir, path) -> None:
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_xl_dir)
    with loader_messages() as messages:
        pipe.load_lora_weights(str(run.run_dir / path))
    failures = [m for m in messages if any(f in m.lower() for f in LOADER_FAILURES)]
    assert not failures, failures
    assert_reproduces(outputs(pipe.unet, pipe.text_encoder, pipe.text_encoder_2), trained, base)


def test_kohya_file_uses_sgm_names_and_sdxl_metadata(run, tiny_xl_dir) -> None:
    with safe_open(str(run.run_dir / "lora" / "kohya.safetensors"), "pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
    prefixes = ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")
    unet_keys = [k for k in keys if k.startswith("lora_unet_")]
    assert unet_keys and all(k.startswith(prefixes) for k in unet_keys)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert any(k.startswith("lora_unet_output_blocks_0_0_in_layers_2.") for k in keys)  # conv1 of a resnet
    for prefix in ("lora_te1_text_model_encoder_layers_", "lora_te2_text_model_encoder_layers_"):
        assert any(k.startswith(prefix) for k in keys), prefix
    assert set(k.split("_", 2)[1] for k in keys) == {"unet", "te1", "te2"}
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["ss_v2"] == "False"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert metadata["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    # diffusers' own sgm → diffusers mapping gives back exactly the trained modules
    unet = UNet2DConditionModel.from_pretrained(tiny_xl_dir, subfolder="unet")
    state, _ = StableDiffusionXLLoraLoaderMixin.lora_state_dict(
        str(run.run_dir / "lora" / "kohya.safetensors"), unet_config=unet.config
    )
    assert not any("input_blocks" in k or "output_blocks" in k for k in state)


def test_sgm_names_follow_the_unet_config() -> None:
    layout = SimpleNamespace(layers_per_block=2, up_block_types=UNET_XL_CONFIG["up_block_types"])
    block = "transformer_blocks.0.attn1.to_q"
    assert sgm_unet_path(f"down_blocks.1.attentions.0.{block}", layout) == f"input_blocks.4.1.{block}"
    assert sgm_unet_path(f"down_blocks.2.attentions.1.{block}", layout) == f"input_blocks.8.1.{block}"
    assert sgm_unet_path(f"mid_block.attentions.0.{block}", layout) == f"middle_block.1.{block}"
    assert sgm_unet_path("mid_block.resnets.1.conv2", layout) == "middle_block.2.out_layers.3"
    assert sgm_unet_path(f"up_blocks.1.attentions.2.{block}", layout) == f"output_blocks.5.1.{block}"
    assert sgm_unet_path("down_blocks.0.downsamplers.0.conv", layout) == "input_blocks.3.0.op"
    assert sgm_unet_path("up_blocks.0.upsamplers.0.conv", layout) == "output_blocks.2.2.conv"
    assert (
        sgm_unet_path("down_blocks.1.resnets.0.conv_shortcut", layout) == "input_blocks.4.0.skip_connection"
    )
    layout.layers_per_block = 1
    assert sgm_unet_path(f"down_blocks.1.attentions.0.{block}", layout) == f"input_blocks.3.1.{block}"


def test_sample_from_an_sdxl_run(run, tmp_path: Path) -> None:
    out = tmp_path / "xl.png"
    cfg = compose_config("sample", [f"source={run.run_dir}", "prompt=a red circle", "steps=2", f"out={out}"])
    assert sample(cfg) == [out]
    image = np.asarray(Image.open(out))
    assert image.shape == (64, 64, 3) and image.std() > 0


# ---- micro-conditioning ----------------------------------------------------------------------------------


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_random_crop_is_recorded_where_it_was_taken() -> None:
    image = _image(64, 160)  # portrait: resized to 64 wide (no change), cropped at a random height
    transform = ImageTransform(64, center_crop=False)
    pixels, placed = transform.placed(image, torch.Generator().manual_seed(3))
    top, left = placed["crop_top_left"].tolist()
    assert left == 0 and 0 < top <= 96
    expected = np.asarray(image.crop((left, top, left + 64, top + 64)), dtype=np.float32) / 127.5 - 1
    torch.testing.assert_close(pixels, torch.from_numpy(expected).permute(2, 0, 1))
    assert placed["original_size"].tolist() == [160, 64] and placed["target_size"].tolist() == [64, 64]
    bucket_pixels, bucket_placed = fit_image_placed(
        image, (64, 64), False, False, torch.Generator().manual_seed(3)
    )
    assert torch.equal(bucket_pixels, pixels)
    assert all(torch.equal(bucket_placed[k], placed[k]) for k in placed)


@pytest.mark.parametrize("bucketing,cached", [(False, False), (True, False), (False, True), (True, True)])
def test_time_ids_reaching_the_unet_match_the_applied_crop(
    tmp_path: Path, cache_dir, monkeypatch, bucketing: bool, cached: bool
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    _image(96, 64, seed=1).save(data / "wide.png")  # centre crop: 16 px off the left
    _image(64, 80, seed=2).save(data / "tall.png")  # centre crop: 8 px off the top
    for name in ("wide", "tall"):
        (data / f"{name}.txt").write_text(f"a {name} picture")
    seen: list[torch.Tensor] = []
    forward = UNet2DConditionModel.forward

    def recording(self, *args, added_cond_kwargs=None, **kwargs):
        seen.append(added_cond_kwargs["time_ids"].detach().clone())
        return forward(self, *args, added_cond_kwargs=added_cond_kwargs, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", recording)
    cfg = compose_config(
        "train",
        [
            *FAST,
            "data=captions",
            f"data.root={data}",
            "data.random_flip=false",
            "data.num_workers=0",
            "trainer.max_steps=1",
            "sampling.prompts=[]",
            "export.formats=[]",
            f"data.bucketing={str(bucketing).lower()}",
            f"data.cache_latents={str(cached).lower()}",
            f"data.latent_cache_dir={tmp_path / 'latents'}",
        ],
        tmp_path / "run",
    )
    train(cfg)
    rows = sorted(map(tuple, seen[0].tolist()))
    if not bucketing:
        assert rows == [(64.0, 96.0, 0.0, 16.0, 64.0, 64.0), (80.0, 64.0, 8.0, 0.0, 64.0, 64.0)]
        return
    (height, width), *others = {row[4:] for row in rows}  # one bucket per batch
    assert not others and height * width <= 64 * 64 and (height, width) != (64, 64)
    for (h, w), row in zip([(64, 96), (80, 64)], rows):
        scale = max(width / w, height / h)  # cover the bucket, then centre-crop
        covered = (max(height, round(h * scale)), max(width, round(w * scale)))
        crop = ((covered[0] - height) // 2, (covered[1] - width) // 2)
        assert row == (h, w, *crop, height, width)


def test_sample_from_the_tiny_xl_base_with_a_kohya_lora(run, tmp_path: Path) -> None:
    out = tmp_path / "base.png"
    lora = run.run_dir / "lora" / "kohya.safetensors"
    cfg = compose_config(
        "sample", ["source=tiny_xl", f"lora={lora}", "prompt=a star", "steps=2", f"out={out}"]
    )
    assert sample(cfg) == [out]
    assert np.asarray(Image.open(out)).shape == (64, 64, 3)


def test_sampler_matches_the_diffusers_sdxl_pipeline(cache_dir, tiny_xl_dir) -> None:
    from omegaconf import OmegaConf

    from sdtune.conditioning import build_conditioning
    from sdtune.models import load_stack
    from sdtune.sampling import generate, make_scheduler

    model = OmegaConf.create({"family": "sdxl", "pretrained": None, "config": None})
    stack = load_stack(model, cache_dir)
    text = OmegaConf.create(
        {"text": {"_target_": "sdtune.conditioning.text.TextConditioner", "dropout": 0.0}}
    )
    conditioning = build_conditioning(text, stack)
    batch = {"caption": ["a red circle"], "negative_caption": [""]}
    ours = generate(
        stack.unet,
        stack.vae,
        conditioning,
        batch,
        scheduler=make_scheduler("euler", stack.scheduler_config),
        steps=3,
        guidance=5.0,
        seed=7,
        height=64,
        width=64,
    )
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_xl_dir)
    pipe.scheduler = make_scheduler("euler", stack.scheduler_config)
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(7))
    theirs = pipe(
        "a red circle",
        negative_prompt="",
        num_inference_steps=3,
        guidance_scale=5.0,
        height=64,
        width=64,
        latents=latents,
        output_type="pt",
    ).images
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_merged_and_single_file_exports_reproduce_the_model(
    run, trained, base, tiny_xl_dir, cache_dir
) -> None:
    from omegaconf import OmegaConf

    from sdtune.models import load_stack

    pipe = StableDiffusionXLPipeline.from_pretrained(run.run_dir / "pipeline")
    assert_reproduces(outputs(pipe.unet, pipe.text_encoder, pipe.text_encoder_2), trained, base)
    single = {
        "family": "sdxl",
        "pretrained": str(run.run_dir / "model.safetensors"),
        "config": str(tiny_xl_dir),
    }
    with loader_messages() as messages:
        stack = load_stack(OmegaConf.create(single), cache_dir)
    assert not [m for m in messages if "unexpected" in m.lower() or "missing" in m.lower()], messages
    got = outputs(stack.unet, stack.text_encoder, stack.text_encoder_2)
    assert_reproduces(got, trained, base)


def test_export_entry_point_rewrites_the_kohya_file_from_the_checkpoint(run, tmp_path: Path) -> None:
    from sdtune.export import export

    out = tmp_path / "again.safetensors"
    export(compose_config("export", [f"source={run.run_dir}", "format=kohya", f"out={out}"]))
    with (
        safe_open(str(out), "pt") as again,
        safe_open(str(run.run_dir / "lora" / "kohya.safetensors"), "pt") as f,
    ):
        assert sorted(again.keys()) == sorted(f.keys())
        for key in f.keys():
            torch.testing.assert_close(again.get_tensor(key), f.get_tensor(key))


def test_full_fine_tuning_trains_both_text_encoders(tmp_path: Path, cache_dir, tiny_xl_dir) -> None:
    cfg = compose_config(
        "train",
        [
            *FAST,
            "method=full",
            "method.train_text_encoder=true",
            "method.lr=1e-3",
            "method.ema=null",
            "trainer.max_steps=1",
            "data.num_images=2",
            "sampling.prompts=[]",
            "export.formats=[pipeline]",
        ],
        tmp_path / "run",
    )
    result = train(cfg)
    pipe = StableDiffusionXLPipeline.from_pretrained(result.run_dir / "pipeline")
    base = StableDiffusionXLPipeline.from_pretrained(tiny_xl_dir)
    for part in ("unet", "text_encoder", "text_encoder_2"):
        trained, original = getattr(pipe, part).state_dict(), getattr(base, part).state_dict()
        assert any(not torch.equal(trained[k], original[k]) for k in original), part


def test_caption_dropout_gives_the_empty_caption_of_both_encoders(cache_dir) -> None:
    from omegaconf import OmegaConf

    from sdtune.conditioning.text import TextConditioner
    from sdtune.models import load_stack

    stack = load_stack(OmegaConf.create({"family": "sdxl", "pretrained": None, "config": None}), cache_dir)
    conditioner = TextConditioner(stack)
    batch = {
        "caption": ["a red circle", "a blue square"],
        "original_size": torch.tensor([[96, 64], [64, 64]]),
        "crop_top_left": torch.tensor([[16, 0], [0, 0]]),
        "target_size": torch.tensor([[64, 64], [64, 64]]),
    }
    with torch.no_grad():
        tokens, added = conditioner(batch, torch.tensor([True, False]))
        empty_tokens, empty_pooled = conditioner.encode_xl([""])
        kept_tokens, kept_pooled = conditioner.encode_xl(["a blue square"])
    assert tokens.shape[-1] == stack.unet.config.cross_attention_dim
    torch.testing.assert_close(tokens[:1], empty_tokens)
    torch.testing.assert_close(added["text_embeds"][:1], empty_pooled)
    torch.testing.assert_close(tokens[1:], kept_tokens)
    torch.testing.assert_close(added["text_embeds"][1:], kept_pooled)
    assert added["time_ids"].tolist() == [[96, 64, 16, 0, 64, 64], [64, 64, 0, 0, 64, 64]]


@pytest.mark.parametrize("path", ["lora/kohya.safetensors", "lora/pytorch_lora_weights.safetensors"])
def test_init_from_reproduces_the_sdxl_adapters(run, trained, cache_dir, path) -> None:
    from sdtune.models import load_stack
    from sdtune.models.adapters import apply_method

    cfg = compose_config(
        "train",
        [
            *FAST,
            "method.rank=4",
            "method.alpha=2",
            "method.train_text_encoder=true",
            f"method.target_modules={UNET_TARGETS}",
            f"method.init_from={run.run_dir / path}",
        ],
    )
    stack = load_stack(cfg.model, cache_dir)
    apply_method(stack, cfg.method)
    stack.unet.eval()
    got = outputs(stack.unet, stack.text_encoder, stack.text_encoder_2)
    for g, w in zip(got, trained):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def test_dreambooth_with_prior_preservation_conditions_both_halves(
    tmp_path: Path, cache_dir, monkeypatch
) -> None:
    seen: list[torch.Tensor] = []
    forward = UNet2DConditionModel.forward

    def recording(self, *args, added_cond_kwargs=None, **kwargs):
        seen.append(added_cond_kwargs["time_ids"].detach().clone())
        return forward(self, *args, added_cond_kwargs=added_cond_kwargs, **kwargs)

    cfg = compose_config(
        "train",
        [
            *FAST,
            "data=dreambooth",
            "data.num_class_images=2",
            "data.class_generation.steps=2",
            "data.synthetic.num_images=2",
            "trainer.max_steps=1",
            "sampling.prompts=[]",
            "export.formats=[diffusers]",
        ],
        tmp_path / "run",
    )
    monkeypatch.setattr(UNet2DConditionModel, "forward", recording)
    train(cfg)
    assert len(seen) > 1  # the class images were generated with the SDXL stack first
    training = seen[-1]  # then one step on 2 instance + 2 class images
    assert training.shape == (4, 6) and training[:, 4:].eq(64).all()


SDXL_BASE_UNET = {  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (architecture keys)
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "use_linear_projection": True,
    "sample_size": 128,
}


@pytest.mark.parametrize("config", [SDXL_BASE_UNET, UNET_XL_CONFIG], ids=["sdxl-base", "tiny_xl"])
def test_sgm_names_of_every_block_module_map_back_through_diffusers(config) -> None:
    import re

    with torch.device("meta"):  # the full-size U-Net's module tree, no weights
        unet = UNet2DConditionModel(**config)
    blocks = ("down_blocks", "mid_block", "up_blocks")
    paths = {
        name
        for name, module in unet.named_modules()
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and name.split(".")[0] in blocks
    }
    state = {}
    for path in paths:
        name = "lora_unet_" + sgm_unet_path(path, unet.config).replace(".", "_")
        state |= {f"{name}.lora_down.weight": torch.zeros(1, 1), f"{name}.lora_up.weight": torch.zeros(1, 1)}
    converted, _ = StableDiffusionXLLoraLoaderMixin.lora_state_dict(state, unet_config=unet.config)

    def module_of(key: str) -> str:
        key = key.removeprefix("unet.").replace(".processor.", ".")
        key = re.sub(r"(_lora)?\.(lora\.)?(down|up)\.weight$", "", key)
        return re.sub(r"\.to_out$", ".to_out.0", key)

    assert {module_of(key) for key in converted} == paths


def test_text_cache_holds_both_encoders_and_the_pooled_embedding(tmp_path: Path, cache_dir) -> None:
    cfg = compose_config(
        "train",
        [
            *FAST,
            "data.num_images=2",
            "trainer.max_steps=1",
            "data.cache_latents=true",
            f"data.latent_cache_dir={tmp_path / 'latents'}",
            "sampling.prompts=[a star]",
            "export.formats=[]",
        ],
        tmp_path / "run",
    )
    result = train(cfg)
    item = result.trainer.datamodule.dataset[0]
    text = result.module.conditioning.components["text"]
    with torch.no_grad():
        tokens, pooled = text.encode_xl([item["caption"], ""])
    torch.testing.assert_close(item["caption_embeds"], tokens[0])
    torch.testing.assert_close(item["caption_pooled"], pooled[0])
    torch.testing.assert_close(item["negative_caption_pooled"], pooled[1])
    assert item["original_size"].tolist() == [64, 64] and list((result.run_dir / "samples").glob("*.png"))


def test_a_flipped_crop_is_recorded_in_the_flipped_image() -> None:
    from PIL import ImageOps

    image = _image(160, 64)  # landscape: cropped at a random left offset
    transform = ImageTransform(64, center_crop=False, random_flip=True)
    flipped_seen = False
    for seed in range(8):
        pixels, placed = transform.placed(image, torch.Generator().manual_seed(seed))
        top, left = placed["crop_top_left"].tolist()
        mirrored = ImageOps.mirror(image)
        in_mirror = np.asarray(mirrored.crop((left, top, left + 64, top + 64)), dtype=np.float32) / 127.5 - 1
        in_image = np.asarray(image.crop((left, top, left + 64, top + 64)), dtype=np.float32) / 127.5 - 1
        flipped = np.allclose(pixels.permute(1, 2, 0).numpy(), in_mirror)
        assert flipped or np.allclose(pixels.permute(1, 2, 0).numpy(), in_image)
        flipped_seen |= flipped and left != 160 - 64 - left
    assert flipped_seen
