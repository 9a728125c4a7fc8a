"""Every export format of a trained run loads with the other tool's own loader and reproduces the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft import PeftModel
from PIL import Image
from safetensors import safe_open

from sdtune.config import ConfigError
from sdtune.export import export
from sdtune.models import load_stack
from sdtune.models.adapters import apply_method
from sdtune.train import train

from .conftest import compose_config
from .test_formats_kohya import LOADER_FAILURES, loader_messages
from .test_train import outputs

FORMATS = ["diffusers", "kohya", "peft", "merged", "single_file"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache_dir):
    run_dir = tmp_path_factory.mktemp("export") / "run"
    cfg = compose_config(
        "train",
        [
            "+experiment=lora",
            "trainer.max_steps=3",
            "data.num_images=8",
            "data.batch_size=2",
            "sampling.every_n_steps=0",
            "sampling.steps=1",
            "sampling.per_prompt=1",
            "logger=none",
            "method.rank=4",
            "method.alpha=2",
            "method.lr=1e-2",
            "method.train_text_encoder=true",
            "method.target_modules=[to_q,to_k,to_v,to_out.0,proj_in,ff.net.2,conv1]",
            f"export.formats=[{','.join(FORMATS)}]",
        ],
        run_dir,
    )
    result = train(cfg)
    result.module.eval()
    return result


@pytest.fixture(scope="module")
def trained(run):
    return outputs(run.module.unet, run.module.stack.text_encoder)


@pytest.fixture(scope="module")
def base(tiny_dir):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir)
    return outputs(pipe.unet, pipe.text_encoder)


def assert_reproduces(got, want, base) -> None:
    for g, w, b in zip(got, want, base):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
        assert (g - b).abs().max() > 1e-3, "the export has no effect"


def test_manifest_lists_every_format(run) -> None:
    import json

    manifest = json.loads((run.run_dir / "manifest.json").read_text())
    assert [e["format"] for e in manifest["exports"]] == FORMATS
    for entry in manifest["exports"]:
        assert (run.run_dir / entry["path"]).exists(), entry


@pytest.mark.parametrize(
    "fmt,path", [("diffusers", "lora/pytorch_lora_weights.safetensors"), ("kohya", "lora/kohya.safetensors")]
)
def test_lora_files_load_with_diffusers(run, trained, base, tiny_dir, fmt, path) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir)
    with loader_messages() as messages:
        pipe.load_lora_weights(run.run_dir / path)
    problems = [m for m in messages if any(f in m.lower() for f in LOADER_FAILURES)]
    assert not problems, problems
    assert_reproduces(outputs(pipe.unet, pipe.text_encoder), trained, base)


def test_kohya_metadata(run) -> None:
    with safe_open(str(run.run_dir / "lora/kohya.safetensors"), "pt") as f:
        metadata = f.metadata()
        alpha = f.get_tensor(next(k for k in f.keys() if k.endswith(".alpha")))
    assert all(isinstance(v, str) for v in metadata.values())
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_v2"] == "False"
    assert metadata["ss_network_dim"] == "4" and float(metadata["ss_network_alpha"]) == 2.0
    assert float(alpha) == 2.0
    assert metadata["ss_output_name"] == run.run_dir.name
    assert metadata["ss_clip_skip"] == "1"
    # The run's training settings, as sd-scripts records them (A1111's and model sites' metadata panels).
    assert float(metadata["ss_learning_rate"]) == 1e-2 and float(metadata["ss_text_encoder_lr"]) == 1e-2
    assert metadata["ss_max_train_steps"] == "3" and metadata["ss_steps"] == "3"
    assert metadata["ss_optimizer"] == "torch.optim.AdamW" and metadata["ss_lr_scheduler"] == "constant"
    assert metadata["ss_caption_dropout_rate"] == "0.1" and metadata["ss_min_snr_gamma"] == "None"
    assert metadata["ss_batch_size_per_device"] == "2" and metadata["ss_sd_model_name"] == "sdtune tiny"
    assert "lora_adapter_metadata" not in metadata


def test_peft_adapters_load_with_peft(run, trained, base, tiny_dir) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir)
    unet = PeftModel.from_pretrained(pipe.unet, run.run_dir / "lora/peft/unet")
    text_encoder = PeftModel.from_pretrained(pipe.text_encoder, run.run_dir / "lora/peft/text_encoder")
    got = outputs(unet.base_model.model, text_encoder.base_model.model)
    assert_reproduces(got, trained, base)


def test_merged_pipeline_loads(run, trained, base) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(run.run_dir / "pipeline")
    assert not any("lora" in name for name, _ in pipe.unet.named_parameters())
    assert_reproduces(outputs(pipe.unet, pipe.text_encoder), trained, base)


def test_single_file_loads_offline(run, trained, base, tiny_dir) -> None:
    pipe = StableDiffusionPipeline.from_single_file(
        str(run.run_dir / "model.safetensors"), config=str(tiny_dir), local_files_only=True
    )
    assert_reproduces(outputs(pipe.unet, pipe.text_encoder), trained, base)


def test_a1111_merge_math(run, tiny_dir) -> None:
    """base + (alpha/r)·up@down, reshaped, equals the merged pipeline's weight for every module."""
    base = StableDiffusionPipeline.from_pretrained(tiny_dir)
    merged = StableDiffusionPipeline.from_pretrained(run.run_dir / "pipeline")
    with safe_open(str(run.run_dir / "lora/kohya.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    modules = {k.rsplit(".", 2)[0] for k in tensors if k.endswith(".lora_down.weight")}
    checked = 0
    for name in modules:
        down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        alpha = float(tensors[f"{name}.alpha"])
        prefix, path = name.split("_", 2)[1], name.split("_", 2)[2]
        model_base, model_merged = (
            (base.unet, merged.unet) if prefix == "unet" else (base.text_encoder, merged.text_encoder)
        )
        param = _find_weight(model_base, path)
        weight = dict(model_base.named_parameters())[param]
        delta = (alpha / down.shape[0]) * (up.flatten(1) @ down.flatten(1))
        expected = weight + delta.reshape(weight.shape)
        torch.testing.assert_close(
            dict(model_merged.named_parameters())[param], expected, atol=1e-5, rtol=1e-4
        )
        checked += 1
    assert checked == len(modules) > 0


def _find_weight(model, kohya_path: str) -> str:
    kohya_path = kohya_path.removeprefix("text_model_")  # transformers 5 dropped the text_model level
    for name, _ in model.named_parameters():
        if name.endswith(".weight") and name[: -len(".weight")].replace(".", "_").endswith(kohya_path):
            return name
    raise AssertionError(f"no parameter for {kohya_path}")


@pytest.mark.parametrize("path", ["lora/kohya.safetensors", "lora/pytorch_lora_weights.safetensors"])
def test_init_from_reproduces_the_adapter(run, trained, cache_dir, path) -> None:
    cfg = compose_config(
        "train",
        [
            "+experiment=lora",
            "method.rank=4",
            "method.alpha=2",
            "method.train_text_encoder=true",
            "method.target_modules=[to_q,to_k,to_v,to_out.0,proj_in,ff.net.2,conv1]",
            f"method.init_from={run.run_dir / path}",
        ],
    )
    stack = load_stack(cfg.model, cache_dir)
    apply_method(stack, cfg.method)
    stack.unet.eval()
    got = outputs(stack.unet, stack.text_encoder)
    for g, w in zip(got, trained):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def test_init_from_with_wrong_rank_names_the_key(run, cache_dir) -> None:
    cfg = compose_config(
        "train",
        [
            "+experiment=lora",
            "method.rank=8",
            "method.train_text_encoder=true",
            "method.target_modules=[to_q,to_k,to_v,to_out.0,proj_in,ff.net.2,conv1]",
            f"method.init_from={run.run_dir / 'lora/pytorch_lora_weights.safetensors'}",
        ],
    )
    stack = load_stack(cfg.model, cache_dir)
    with pytest.raises(ValueError, match=r"key '.*lora_A.*' has shape \(4, .*method.rank"):
        apply_method(stack, cfg.method)


def test_export_cli_function_refuses_to_overwrite(run, tmp_path) -> None:
    out = tmp_path / "mine.safetensors"
    out.write_bytes(b"user data")
    cfg = compose_config("export", [f"source={run.run_dir}", "format=kohya", f"out={out}"])
    with pytest.raises(ConfigError, match="overwrite=true"):
        export(cfg)
    assert out.read_bytes() == b"user data"
    written = export(
        compose_config("export", [f"source={run.run_dir}", "format=kohya", f"out={out}", "overwrite=true"])
    )
    with (
        safe_open(str(written), "pt") as f,
        safe_open(str(run.run_dir / "lora/kohya.safetensors"), "pt") as g,
    ):
        assert f.metadata()["ss_network_dim"] == "4"
        trained = {k: v for k, v in g.metadata().items() if k.startswith("ss_") and "hash" not in k}
        assert {k: f.metadata().get(k) for k in trained} == trained  # re-exported: the same training record


def test_export_cli_from_a_checkpoint_matches_the_run_export(run, tmp_path) -> None:
    out = tmp_path / "again"
    export(
        compose_config(
            "export",
            [f"source={run.run_dir / 'checkpoints' / 'last.ckpt'}", "format=diffusers", f"out={out}"],
        )
    )
    with (
        safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as a,
        safe_open(str(run.run_dir / "lora/pytorch_lora_weights.safetensors"), "pt") as b,
    ):
        assert set(a.keys()) == set(b.keys())
        for key in a.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key


def _file_tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


@pytest.mark.parametrize(
    "fmt,weights",
    [
        ("diffusers", ["pytorch_lora_weights.safetensors"]),
        ("kohya", [""]),
        ("peft", ["unet/adapter_model.safetensors", "text_encoder/adapter_model.safetensors"]),
        ("merged", ["unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"]),
        ("single_file", [""]),
    ],
)
def test_export_dtype_writes_every_weight_in_that_type(run, tmp_path, fmt, weights) -> None:
    """`dtype=float16` (kohya's --save_precision fp16): every floating tensor of the file is fp16, and the
    LoRA formats hold the fp32 export's values rounded, nothing else."""
    out = tmp_path / ("out.safetensors" if fmt in ("kohya", "single_file") else "out")
    args = [f"source={run.run_dir}", f"format={fmt}", f"out={out}", "dtype=float16"]
    export(compose_config("export", args))
    for weight in weights:
        tensors = _file_tensors(out / weight if weight else out)
        floats = {k: t.dtype for k, t in tensors.items() if t.is_floating_point()}
        assert floats and set(floats.values()) == {torch.float16}, (weight, set(floats.values()))
    if fmt in ("diffusers", "kohya"):
        full = _file_tensors(run.run_dir / RUN_FILES[fmt])
        assert {t.dtype for t in full.values()} == {torch.float32}
        assert tensors.keys() == full.keys()
        for key, tensor in tensors.items():
            assert torch.equal(tensor, full[key].to(torch.float16)), key


RUN_FILES = {"diffusers": "lora/pytorch_lora_weights.safetensors", "kohya": "lora/kohya.safetensors"}


def test_an_fp16_kohya_file_loads_in_diffusers_and_reproduces_the_run(run, trained, base, tiny_dir, tmp_path):
    out = tmp_path / "half.safetensors"
    export(compose_config("export", [f"source={run.run_dir}", "format=kohya", f"out={out}", "dtype=fp16"]))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir)
    pipe.load_lora_weights(out)
    for got, want, b in zip(outputs(pipe.unet, pipe.text_encoder), trained, base):
        torch.testing.assert_close(got, want, atol=5e-3, rtol=5e-3)
        assert (got - b).abs().max() > 1e-2, "the export has no effect"


def test_an_unknown_export_dtype_is_named(run, tmp_path) -> None:
    out = tmp_path / "x.safetensors"
    args = [f"source={run.run_dir}", "format=kohya", f"out={out}", "dtype=half"]
    with pytest.raises(ConfigError, match=r"dtype: unknown dtype 'half'.*float16"):
        export(compose_config("export", args))
    assert not out.exists()


def test_formats_that_cannot_hold_the_training_are_refused_before_it(tmp_path) -> None:
    """A LoRA on the token embedding has no kohya key: refused before the first step, naming the format."""
    run_dir = tmp_path / "run"
    cfg = compose_config(
        "train",
        [
            "+experiment=lora",
            "trainer.max_steps=2",
            "data.num_images=4",
            "data.batch_size=2",
            "sampling.prompts=[]",
            "logger=none",
            "method.train_text_encoder=true",
            "method.text_encoder_target_modules=[q_proj,token_embedding]",
            "export.formats=[peft,kohya]",
        ],
        run_dir,
    )
    with pytest.raises(ConfigError) as info:
        train(cfg)
    assert len(info.value.problems) == 1 and "export.formats: kohya" in str(info.value)
    assert "token_embedding" in str(info.value)
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "lora").exists()  # nothing trained


def test_a_run_that_exported_only_kohya_samples_through_it(run, tmp_path) -> None:
    """Sampling a run reads its diffusers LoRA, or its kohya file when that is all it exported."""
    import json
    import shutil
    from pathlib import Path

    from sdtune.sample import sample

    only_kohya = tmp_path / "run"
    shutil.copytree(run.run_dir / ".hydra", only_kohya / ".hydra")
    shutil.copy(run.run_dir / "lora" / "kohya.safetensors", only_kohya / "kohya.safetensors")
    manifest = json.loads((run.run_dir / "manifest.json").read_text())
    manifest["exports"] = [{"format": "kohya", "path": "kohya.safetensors"}]
    (only_kohya / "manifest.json").write_text(json.dumps(manifest))

    def draw(source):
        out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}"
        args = [f"source={source}", "prompt=a red star", "steps=3", "seed=3", f"out={out}"]
        (path,) = sample(compose_config("sample", args))
        return np.asarray(Image.open(path), dtype=np.int16)

    kohya, diffusers, base = draw(only_kohya), draw(run.run_dir), draw(Path("tiny"))
    assert np.abs(kohya - diffusers).max() <= 2, "the kohya file reproduces the diffusers LoRA"
    assert np.abs(kohya - base).max() > 20, "the LoRA was not applied"


def test_export_names_a_missing_out(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"out: required"):
        export(compose_config("export", [f"source={tmp_path}", "format=kohya"]))


def test_a_run_whose_config_or_manifest_no_longer_parses_is_named_before_loading(tmp_path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"not read: the check comes first")
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "config.yaml").write_text("model: [")
    (run_dir / "manifest.json").write_text('["a list"]')
    with pytest.raises(ConfigError) as info:
        export(compose_config("export", [f"source={run_dir}", "format=kohya", f"out={tmp_path / 'x'}"]))
    message = str(info.value)
    assert "2 configuration problem(s)" in message
    assert "unreadable .hydra/config.yaml" in message and "unreadable manifest.json" in message
