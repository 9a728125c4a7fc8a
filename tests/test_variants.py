"""Adapter variants (DoRA, LoHa, LoKr) train only their own weights and export in the formats that hold them;
zero-terminal-SNR betas match the hand computation."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from peft import PeftModel
from safetensors.torch import load_file

from sdtune.formats.exporters import ExportError, context_from_module, export_diffusers, export_kohya
from sdtune.formats.lycoris import lycoris_delta
from sdtune.models.adapters import zero_terminal_snr_scheduler
from sdtune.train import train

from .conftest import compose_config
from .test_train import outputs

MARKERS = {"dora": ("lora_",), "loha": ("hada_",), "lokr": ("lokr_",)}
TARGETS = "method.target_modules=[to_q,to_k,to_v,to_out.0,conv1]"


@pytest.fixture(scope="module", params=sorted(MARKERS))
def variant_run(request, tmp_path_factory, cache_dir):
    variant = request.param
    run_dir = tmp_path_factory.mktemp(variant) / "run"
    formats = "[diffusers,peft]" if variant == "dora" else "[kohya,peft]"
    cfg = compose_config(
        "train",
        [
            "+experiment=lora",
            f"method.variant={variant}",
            "method.rank=4",
            "method.alpha=2",
            "method.lr=1e-2",
            TARGETS,
            "trainer.max_steps=2",
            "data.num_images=4",
            "data.batch_size=2",
            "sampling.every_n_steps=0",
            "sampling.steps=1",
            "sampling.per_prompt=1",
            "logger=none",
            f"export.formats={formats}",
        ],
        run_dir,
    )
    run = train(cfg)
    run.module.eval()
    return variant, run


def test_only_the_variant_weights_train(variant_run, tiny_dir) -> None:
    variant, run = variant_run
    trainable = run.module.trainable_parameters()
    assert trainable and all(any(m in name for m in MARKERS[variant]) for name in trainable)
    if variant == "dora":
        assert any("lora_magnitude_vector" in name for name in trainable)
    base = StableDiffusionPipeline.from_pretrained(tiny_dir).unet.state_dict()
    frozen = {
        k.replace(".base_layer", ""): v
        for k, v in run.module.unet.state_dict().items()
        if not any(m in k for m in ("lora_", "hada_", "lokr_"))
    }
    assert frozen.keys() == base.keys()
    assert all(torch.equal(v, base[k]) for k, v in frozen.items())


def test_peft_export_reloads_with_matching_outputs(variant_run, tiny_dir) -> None:
    _, run = variant_run
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir)
    base_out = outputs(pipe.unet, pipe.text_encoder)[0]
    unet = PeftModel.from_pretrained(pipe.unet, run.run_dir / "lora/peft/unet").base_model.model
    got = outputs(unet, pipe.text_encoder)[0]
    want = outputs(run.module.unet, run.module.stack.text_encoder)[0]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (got - base_out).abs().max() > 1e-4


def test_dora_loads_with_diffusers_and_lycoris_math_matches_the_merge(variant_run, tiny_dir) -> None:
    variant, run = variant_run
    ctx = context_from_module(run.module, name="x", resolution=64, num_train_images=4)
    if variant == "dora":
        pipe = StableDiffusionPipeline.from_pretrained(tiny_dir)
        pipe.load_lora_weights(run.run_dir / "lora/pytorch_lora_weights.safetensors")
        want = outputs(run.module.unet, run.module.stack.text_encoder)[0]
        torch.testing.assert_close(outputs(pipe.unet, pipe.text_encoder)[0], want, atol=1e-4, rtol=1e-4)
        with pytest.raises(ExportError, match="format=peft"):
            export_kohya(ctx, run.run_dir / "never.safetensors")
        return
    with pytest.raises(ExportError, match="format=peft"):
        export_diffusers(ctx, run.run_dir / "never")
    tensors = load_file(run.run_dir / "lora/kohya.safetensors")
    merged_model = _merged_unet(run)
    base = StableDiffusionPipeline.from_pretrained(tiny_dir).unet
    base_params, merged_params = dict(base.named_parameters()), dict(merged_model.named_parameters())
    names = {k.rsplit(".", 1)[0] for k in tensors if not k.endswith(".alpha")}
    for name in names:
        param = next(
            p
            for p in base_params
            if p.endswith(".weight") and "lora_unet_" + p[: -len(".weight")].replace(".", "_") == name
        )
        expected = base_params[param] + lycoris_delta(tensors, name, base_params[param].shape)
        torch.testing.assert_close(merged_params[param], expected, atol=1e-5, rtol=1e-4)
    assert names


def test_lycoris_reads_the_kohya_file_as_it_was_trained(variant_run, tiny_dir) -> None:
    """An independent reader: LyCORIS' own module loader (`lycoris.modules.get_module`/`make_module`, what its
    sd-scripts, A1111 and ComfyUI integrations build on) recognises every key group of the file as the right
    algorithm and, applied to a fresh base, reproduces the trained model."""
    from lycoris.modules import get_module, make_module

    variant, run = variant_run
    if variant == "dora":  # no kohya file: refused above
        return
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir)
    weights = load_file(run.run_dir / "lora/kohya.safetensors")
    targets = {
        f"{prefix}_{name}".replace(".", "_"): module
        for prefix, model in (("lora_unet", pipe.unet), ("lora_te", pipe.text_encoder))
        for name, module in model.named_modules()
    }
    groups = {key.split(".")[0] for key in weights}
    assert groups and groups <= targets.keys(), sorted(groups - targets.keys())[:3]
    base_out = outputs(pipe.unet, pipe.text_encoder)[0]
    for group in groups:
        algorithm, params = get_module(weights, group)
        assert algorithm.__name__ == {"loha": "LohaModule", "lokr": "LokrModule"}[variant], group
        # Its forward, as LyCORIS trains and infers (its merge_to applies alpha / r a second time in 4.1).
        make_module(algorithm, params, group, targets[group]).apply_to()
    got = outputs(pipe.unet, pipe.text_encoder)[0]
    want = outputs(run.module.unet, run.module.stack.text_encoder)[0]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (got - base_out).abs().max() > 1e-4


def _merged_unet(run):
    from sdtune.formats.exporters import merged_models

    ctx = context_from_module(run.module, name="x", resolution=64, num_train_images=4)
    return merged_models(ctx)[0]


def test_zero_terminal_snr_betas_match_hand_computation() -> None:
    base = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    rescaled = zero_terminal_snr_scheduler(base)
    # Lin et al. 2023, Algorithm 1: shift and scale √ᾱ so its last value is 0 and its first is unchanged.
    sqrt_ab = torch.cumprod(1 - base.betas.double(), 0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    alphas_bar = sqrt_ab**2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    torch.testing.assert_close(rescaled.betas.double(), 1 - alphas, atol=1e-5, rtol=1e-4)  # fp32 in diffusers
    assert rescaled.alphas_cumprod[-1] == 0
    assert rescaled.config.timestep_spacing == "trailing"


def test_a_v_prediction_zero_snr_run_samples_and_exports_with_its_own_schedule(tiny_dir, tmp_path) -> None:
    """An SD2-v style run over the epsilon tiny base: the training target, the run's samplers
    (`sdtune.sample`), the merged pipeline's scheduler and the kohya header all say v-prediction, zero
    terminal SNR and trailing timesteps."""
    from omegaconf import OmegaConf

    from sdtune.export import export
    from sdtune.sample import load_source

    run_dir = tmp_path / "run"
    overrides = [
        "+experiment=lora",
        f"model.pretrained={tiny_dir}",
        "model.family=sd2",
        "loss.prediction_type=v_prediction",
        "method.zero_terminal_snr=true",
        "trainer.max_steps=1",
        "data.num_images=4",
        "sampling.every_n_steps=0",
        "logger=none",
    ]
    run = train(compose_config("train", overrides, run_dir))
    (run_dir / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(compose_config("train", overrides), run_dir / ".hydra" / "config.yaml")

    def schedule(config) -> tuple:
        return config["prediction_type"], config["rescale_betas_zero_snr"], config["timestep_spacing"]

    expected = ("v_prediction", True, "trailing")
    assert run.module.prediction_type == "v_prediction"
    assert schedule(run.module.stack.noise_scheduler.config) == expected  # training-time samples
    sample_cfg = compose_config("sample", [f"source={run_dir}", "prompt=a star", "out=x.png"])
    stack, _, _ = load_source(sample_cfg)
    assert schedule(stack.noise_scheduler.config) == expected
    base_stack, _, _ = load_source(compose_config("sample", ["source=tiny", "prompt=a", "out=x.png"]))
    assert schedule(base_stack.noise_scheduler.config) == ("epsilon", False, "leading")

    export(compose_config("export", [f"source={run_dir}", "format=merged", f"out={tmp_path / 'merged'}"]))
    merged = StableDiffusionPipeline.from_pretrained(tmp_path / "merged")
    assert schedule(merged.scheduler.config) == expected

    from safetensors import safe_open

    with safe_open(str(run_dir / "lora" / "kohya.safetensors"), "pt") as kohya:
        header = kohya.metadata()
    assert header["ss_v2"] == "True" and header["ss_base_model_version"] == "sd_v2_v"
    assert header["modelspec.prediction_type"] == "v"
