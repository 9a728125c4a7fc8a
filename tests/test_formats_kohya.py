"""sdtune.formats.kohya: exported files load through diffusers' own kohya path and match peft's math."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import safetensors.torch
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from peft import (
    LoraConfig,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import CLIPTextConfig, CLIPTextModel

from sdtune.formats.kohya import kohya_to_peft, peft_target_modules, peft_to_kohya
from sdtune.formats.kohya_file import addnet_hash, kohya_metadata, load_kohya, save_kohya

UNET_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
LOADER_FAILURES = (
    "unexpected keys",
    "missing keys",
    "no lora keys",
    "not been correctly renamed",
    "did not match any targeted module",
)
REQUIRED_METADATA = {
    *("ss_base_model_version", "ss_v2", "ss_network_module", "ss_network_dim", "ss_network_alpha"),
    *("ss_network_args", "ss_output_name", "ss_resolution", "ss_num_train_images"),
    *("sshs_model_hash", "sshs_legacy_hash", "modelspec.sai_model_spec", "modelspec.architecture"),
    *("modelspec.implementation", "modelspec.title", "modelspec.resolution", "modelspec.date"),
    "modelspec.prediction_type",
}

_generator = torch.Generator().manual_seed(2)
LATENTS = torch.randn(1, 4, 8, 8, generator=_generator)
TIMESTEPS = torch.tensor([500])
HIDDEN = torch.randn(1, 5, 64, generator=_generator)
TOKEN_IDS = torch.randint(0, 1000, (1, 5), generator=_generator)

Outputs = tuple[torch.Tensor, torch.Tensor]


def tiny_unet(width: int = 32) -> UNet2DConditionModel:
    """An SD1-shaped U-Net (1x1-conv proj_in) at small widths, same weights on every call."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(width, width, 2 * width, 2 * width),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=32,
        sample_size=8,
    ).eval()


def tiny_text_encoder() -> CLIPTextModel:
    """A small CLIP text encoder, same weights on every call."""
    torch.manual_seed(1)
    config = CLIPTextConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=1000,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    return CLIPTextModel(config).eval()


def lora(r: int = 4, alpha: float = 2, targets: list[str] = UNET_TARGETS, **kwargs: object) -> LoraConfig:
    """A LoraConfig with non-zero B so the adapter changes the outputs."""
    return LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=False, target_modules=list(targets), **kwargs)


def adapted(unet_config: LoraConfig, te_config: LoraConfig) -> tuple[UNet2DConditionModel, CLIPTextModel]:
    """Tiny U-Net and text encoder with trained-looking (random) LoRA adapters."""
    unet, te = tiny_unet(), tiny_text_encoder()
    torch.manual_seed(3)
    unet.add_adapter(unet_config)
    inject_adapter_in_model(te_config, te)  # transformers' own add_adapter demands a newer peft
    return unet, te


@torch.no_grad()
def run(unet: torch.nn.Module, te: torch.nn.Module) -> Outputs:
    """U-Net noise prediction and text-encoder hidden states on fixed inputs."""
    return unet(LATENTS, TIMESTEPS, HIDDEN).sample, te(TOKEN_IDS).last_hidden_state


def export(unet: torch.nn.Module, te: torch.nn.Module, **kwargs: object) -> dict[str, torch.Tensor]:
    """The kohya state dict of both adapters."""
    return peft_to_kohya(
        get_peft_model_state_dict(unet),
        unet.peft_config["default"],
        get_peft_model_state_dict(te),
        te.peft_config["default"],
        **kwargs,
    )


def metadata(**overrides: object) -> dict[str, str]:
    """Metadata for an SD1 LoRA."""
    kwargs: dict = dict(
        base_model_version="sd_v1",
        v2=False,
        rank=4,
        alpha=2.0,
        network_args=None,
        output_name="tiny",
        resolution=(512, 512),
        num_train_images=3,
        prediction_type="epsilon",
        title="tiny",
    )
    return kohya_metadata(**{**kwargs, **overrides})


def save(tmp_path: Path, state_dict: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / "lora.safetensors"
    save_kohya(path, state_dict, metadata())
    return path


@contextlib.contextmanager
def loader_messages() -> Iterator[list[str]]:
    """Collect diffusers/peft/transformers log records and Python warnings raised inside the block."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = Collect()
    loggers = [logging.getLogger(name) for name in ("diffusers", "peft", "transformers")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
        messages.extend(str(warning.message) for warning in caught)
    finally:
        for logger, level in zip(loggers, levels):
            logger.removeHandler(handler)
            logger.setLevel(level)


def load_with_diffusers(path: Path) -> tuple[UNet2DConditionModel, CLIPTextModel]:
    """Fresh base models with the file loaded by diffusers' SD1 loader; any sign of dropped keys fails."""
    unet, te = tiny_unet(), tiny_text_encoder()
    with loader_messages() as messages:
        state_dict, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(str(path))
        StableDiffusionLoraLoaderMixin.load_lora_into_unet(state_dict, alphas, unet=unet)
        StableDiffusionLoraLoaderMixin.load_lora_into_text_encoder(state_dict, alphas, text_encoder=te)
    problems = [m for m in messages if any(failure in m.lower() for failure in LOADER_FAILURES)]
    assert not problems, problems
    assert "Non-diffusers checkpoint detected." in messages  # i.e. diffusers took its kohya path
    return unet, te


def load_with_peft(
    unet_sd: dict[str, torch.Tensor], te_sd: dict[str, torch.Tensor], rank: int, alpha: float
) -> tuple[UNet2DConditionModel, CLIPTextModel]:
    """Fresh base models with one LoraConfig(rank, alpha) each and the imported weights set."""
    models = tiny_unet(), tiny_text_encoder()
    for model, state_dict in zip(models, (unet_sd, te_sd)):
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=peft_target_modules(state_dict))
        inject_adapter_in_model(config, model)
        result = set_peft_model_state_dict(model, state_dict)
        assert not result.unexpected_keys
        assert not [key for key in result.missing_keys if "lora_" in key]
    return models


def assert_reproduces(got: Outputs, want: Outputs, base: Outputs, atol: float = 1e-4) -> None:
    """Adapted outputs match the reference and are not simply the base model's."""
    for got_part, want_part, base_part in zip(got, want, base):
        torch.testing.assert_close(got_part, want_part, atol=atol, rtol=1e-4)
        assert (got_part - base_part).abs().max() > 1e-3


def alphas(state_dict: dict[str, torch.Tensor]) -> set[float]:
    return {float(value) for key, value in state_dict.items() if key.endswith(".alpha")}


CONFIGS = {
    "plain": (lora(), lora(targets=TE_TARGETS)),
    "rslora": (lora(use_rslora=True), lora(r=8, alpha=3, targets=TE_TARGETS, use_rslora=True)),
    "patterns": (
        lora(rank_pattern={"to_k": 2, "conv1": 8}, alpha_pattern={"to_v": 8, "proj_out": 1}),
        lora(targets=TE_TARGETS, rank_pattern={"q_proj": 2}, alpha_pattern={"out_proj": 6}),
    ),
    "te_q_v_only": (lora(), lora(targets=["q_proj", "v_proj"])),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models: thread hand-offs cost more than the maths, many times more on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass(frozen=True)
class Trained:
    """Adapted models of one CONFIGS case, their outputs and their kohya export; tests must not mutate it."""

    unet: UNet2DConditionModel
    te: CLIPTextModel
    outputs: Outputs
    state_dict: dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def base() -> Outputs:
    return run(tiny_unet(), tiny_text_encoder())


@pytest.fixture(scope="module")
def trained() -> Callable[[str], Trained]:
    """Build each CONFIGS case once per module: adapting and running the models dominates the test time."""
    cache: dict[str, Trained] = {}

    def get(case: str) -> Trained:
        if case not in cache:
            unet, te = adapted(*CONFIGS[case])
            cache[case] = Trained(unet, te, run(unet, te), export(unet, te))
        return cache[case]

    return get


def test_diffusers_loads_export_onto_fresh_base(tmp_path: Path, base: Outputs, trained: Callable) -> None:
    case = trained("plain")
    unet, want, state_dict = case.unet, case.outputs, case.state_dict
    assert alphas(state_dict) == {2.0}  # the trained alpha, not the rank
    assert state_dict["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape == (4, 32, 1, 1)
    assert state_dict["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (4, 32, 3, 3)
    assert state_dict["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"].shape == (32, 4, 1, 1)
    assert "lora_te_text_model_encoder_layers_1_self_attn_out_proj.lora_up.weight" in state_dict
    assert len(state_dict) == 3 * len(peft_target_modules(get_peft_model_state_dict(unet))) + 3 * 8
    assert_reproduces(run(*load_with_diffusers(save(tmp_path, state_dict))), want, base)


@pytest.mark.parametrize("case", ["rslora", "patterns", "te_q_v_only"])
def test_diffusers_reproduces_rslora_patterns_and_partial_attention(
    tmp_path: Path, base: Outputs, trained: Callable, case: str
) -> None:
    want, state_dict = trained(case).outputs, trained(case).state_dict
    assert len(alphas(state_dict)) == 1  # diffusers keeps only one alpha for attention modules
    if case == "te_q_v_only":
        assert "lora_te_text_model_encoder_layers_0_self_attn_out_proj.lora_up.weight" in state_dict
    assert_reproduces(run(*load_with_diffusers(save(tmp_path, state_dict))), want, base)


def merged(adapted_model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `adapted_model` with its adapter merged into the base weights by peft."""
    merged_model = copy.deepcopy(adapted_model)
    for module in merged_model.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()  # what merge_and_unload runs per layer, without re-injecting a PeftModel
    return merged_model


@pytest.mark.parametrize("case", ["plain", "rslora", "patterns"])
def test_a1111_comfy_math_matches_peft_merge_for_every_module(trained: Callable, case: str) -> None:
    unet, te, state_dict = trained(case).unet, trained(case).te, trained(case).state_dict
    checked = 0
    for prefix, base_model, merged_model in (
        ("lora_unet_", tiny_unet(), merged(unet)),
        ("lora_te_", tiny_text_encoder(), merged(te)),
    ):
        for path, module in base_model.named_modules():
            kohya_path = (
                path if prefix == "lora_unet_" or path.startswith("text_model.") else "text_model." + path
            )
            name = prefix + kohya_path.replace(".", "_")
            if name + ".alpha" not in state_dict:
                continue
            down, up = state_dict[name + ".lora_down.weight"], state_dict[name + ".lora_up.weight"]
            scale = float(state_dict[name + ".alpha"]) / down.shape[0]
            weight = module.weight + scale * (up.flatten(1) @ down.flatten(1)).reshape(module.weight.shape)
            merged_weight = merged_model.get_submodule(path).get_base_layer().weight
            torch.testing.assert_close(weight, merged_weight, atol=1e-5, rtol=1e-5)
            checked += 1
    assert checked * 3 == len(state_dict)


def test_metadata_keys_strings_and_hash(tmp_path: Path, trained: Callable) -> None:
    meta = metadata(
        base_model_version="sd_v2_v",
        v2=True,
        network_args={"conv_dim": "4", "conv_alpha": "2"},
        resolution=(768, 512),
        prediction_type="v_prediction",
        extra={"ss_sd_model_name": "tiny-sd2"},
    )
    path = tmp_path / "lora.safetensors"
    save_kohya(path, trained("plain").state_dict, meta)
    tensors, stored = load_kohya(path)
    assert REQUIRED_METADATA <= stored.keys()
    assert all(isinstance(value, str) for value in stored.values())
    assert "lora_adapter_metadata" not in stored
    assert stored.items() >= meta.items()
    assert (stored["ss_base_model_version"], stored["ss_v2"]) == ("sd_v2_v", "True")
    assert stored["ss_network_module"] == "networks.lora"
    assert (stored["ss_network_dim"], float(stored["ss_network_alpha"])) == ("4", 2.0)
    assert json.loads(stored["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "2"}
    assert stored["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert (stored["modelspec.prediction_type"], stored["modelspec.resolution"]) == ("v", "768x512")
    data = path.read_bytes()
    assert stored["sshs_model_hash"] == addnet_hash(path)
    assert addnet_hash(path) == hashlib.sha256(data[8 + int.from_bytes(data[:8], "little") :]).hexdigest()
    assert len(tensors) == 3 * 222
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors"]  # no temp file left


def test_hashes_cover_tensor_bytes_only_and_legacy_window(tmp_path: Path) -> None:
    tensors = {  # over 1 MiB, so the legacy hash window holds tensor bytes
        "lora_unet_x.lora_down.weight": torch.randn(4, 70_000),
        "lora_unet_x.lora_up.weight": torch.randn(70_000, 4),
        "lora_unet_x.alpha": torch.tensor(2.0),
    }
    plain, rich = safetensors.torch.save(tensors), safetensors.torch.save(tensors, metadata())
    assert plain[8 + int.from_bytes(plain[:8], "little") :] == rich[8 + int.from_bytes(rich[:8], "little") :]
    path = tmp_path / "big.safetensors"
    save_kohya(path, tensors, metadata())
    data, stored = path.read_bytes(), load_kohya(path)[1]
    assert stored["sshs_model_hash"] == addnet_hash(path)
    assert stored["sshs_legacy_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert stored["sshs_legacy_hash"] != hashlib.sha256(b"").hexdigest()[:8]


def test_metadata_refuses_what_readers_would_mishandle(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="lora_adapter_metadata"):
        metadata(extra={"lora_adapter_metadata": "{}"})
    with pytest.raises(ValueError, match="lora_adapter_metadata"):
        save_kohya(tmp_path / "x.safetensors", {}, {"lora_adapter_metadata": "{}"})
    with pytest.raises(ValueError, match="must be str.*ss_epoch"):
        save_kohya(tmp_path / "x.safetensors", {}, {"ss_epoch": 3})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="contradicts"):
        metadata(base_model_version="sd_v2", v2=False)
    with pytest.raises(ValueError, match="lora_unet_/lora_te_"):
        save_kohya(tmp_path / "x.safetensors", {"unet.x.lora_A.weight": torch.zeros(1)}, {})
    assert not list(tmp_path.iterdir())


def test_import_reproduces_adapter_exactly(tmp_path: Path, trained: Callable) -> None:
    unet, te, want = trained("plain").unet, trained("plain").te, trained("plain").outputs
    state_dict, _ = load_kohya(save(tmp_path, trained("plain").state_dict))
    unet_sd, te_sd, rank, alpha = kohya_to_peft(state_dict, tiny_unet(), tiny_text_encoder())
    assert (rank, alpha) == (4, 2.0)
    for got, reference in (
        (unet_sd, get_peft_model_state_dict(unet)),
        (te_sd, get_peft_model_state_dict(te)),
    ):
        assert got.keys() == reference.keys()
        assert all(torch.equal(got[key], reference[key]) for key in got)
    torch.testing.assert_close(run(*load_with_peft(unet_sd, te_sd, rank, alpha)), want, atol=1e-6, rtol=0)


def test_import_folds_per_module_ranks_and_alphas(trained: Callable) -> None:
    want, state_dict = trained("patterns").outputs, dict(trained("patterns").state_dict)
    # Rewrite two modules the way other tools do: a private alpha, and no alpha at all (meaning alpha = rank).
    own = "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    state_dict[own + ".alpha"] = state_dict[own + ".alpha"] * 4
    state_dict[own + ".lora_up.weight"] = state_dict[own + ".lora_up.weight"] / 4
    bare = "lora_te_text_model_encoder_layers_1_self_attn_q_proj"
    rank = state_dict[bare + ".lora_down.weight"].shape[0]
    state_dict[bare + ".lora_up.weight"] = (
        state_dict[bare + ".lora_up.weight"] * state_dict.pop(bare + ".alpha") / rank
    )
    unet_sd, te_sd, rank, alpha = kohya_to_peft(state_dict, tiny_unet(), tiny_text_encoder())
    assert rank == 8  # the largest, from rank_pattern conv1
    torch.testing.assert_close(run(*load_with_peft(unet_sd, te_sd, rank, alpha)), want, atol=1e-5, rtol=1e-5)


def test_import_accepts_2d_pointwise_conv_weights_and_lora_te1(trained: Callable) -> None:
    state_dict = trained("plain").state_dict
    variant = {
        key.replace("lora_te_", "lora_te1_"): value.flatten(1)
        if "proj_in" in key and value.dim() == 4
        else value
        for key, value in state_dict.items()
    }
    assert variant["lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"].dim() == 2
    expected = kohya_to_peft(state_dict, tiny_unet(), tiny_text_encoder())
    got = kohya_to_peft(variant, tiny_unet(), tiny_text_encoder())
    for got_part, expected_part in zip(got[:2], expected[:2]):
        assert got_part.keys() == expected_part.keys()
        assert all(torch.equal(got_part[key], expected_part[key]) for key in got_part)


def test_import_rejects_other_models_and_unknown_keys(trained: Callable) -> None:
    wide = tiny_unet(width=64)
    wide.add_adapter(lora())
    wide_file = peft_to_kohya(get_peft_model_state_dict(wide), wide.peft_config["default"])
    first = "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"
    assert next(iter(wide_file)) == first
    with pytest.raises(
        ValueError, match=re.escape(first) + r".*\(4, 64, 1, 1\).*\(4, 32, 1, 1\).*different base"
    ):
        kohya_to_peft(wide_file, tiny_unet())

    state_dict = trained("plain").state_dict
    stray = {
        "lora_unet_not_a_module.lora_down.weight": torch.zeros(4, 4),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.dora_scale": torch.zeros(64),
    }
    listed = re.escape(", ".join(sorted(stray)))
    with pytest.raises(ValueError, match=listed):
        kohya_to_peft({**state_dict, **stray}, tiny_unet(), tiny_text_encoder())
    with pytest.raises(ValueError, match="pass text_encoder="):
        kohya_to_peft(state_dict, tiny_unet())
    sgm = {"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(4, 32, 1, 1)}
    with pytest.raises(ValueError, match="SDXL"):
        kohya_to_peft(sgm, tiny_unet())


def test_export_refuses_what_kohya_cannot_hold() -> None:
    pair = {"a.lora_A.weight": torch.randn(4, 8), "a.lora_B.weight": torch.randn(6, 4)}
    with pytest.raises(ValueError, match="DoRA"):
        peft_to_kohya(pair, LoraConfig(r=4, target_modules=["a"], use_dora=True))
    with pytest.raises(ValueError, match="a.lora_magnitude_vector"):
        peft_to_kohya(
            {**pair, "a.lora_magnitude_vector": torch.ones(6)}, LoraConfig(r=4, target_modules=["a"])
        )
    with pytest.raises(ValueError, match="a: the weights have rank 4 but the LoraConfig gives rank 8"):
        peft_to_kohya(pair, LoraConfig(r=8, target_modules=["a"]))


def test_export_dtype_and_fresh_tensors() -> None:
    pair = {"a.lora_A.weight": torch.randn(4, 8), "a.lora_B.weight": torch.randn(6, 4)}
    out = peft_to_kohya(pair, LoraConfig(r=4, lora_alpha=2, target_modules=["a"]), dtype=torch.float16)
    assert out["lora_unet_a.lora_down.weight"].dtype == torch.float16
    assert out["lora_unet_a.alpha"].dtype == torch.float32 and out["lora_unet_a.alpha"].dim() == 0
    same = peft_to_kohya(pair, LoraConfig(r=4, lora_alpha=2, target_modules=["a"]))
    assert torch.equal(same["lora_unet_a.lora_up.weight"], pair["a.lora_B.weight"])
    assert same["lora_unet_a.lora_up.weight"].data_ptr() != pair["a.lora_B.weight"].data_ptr()


def test_sdxl_export_needs_the_unet_layout_and_writes_sdxl_metadata() -> None:
    with pytest.raises(ValueError, match="unet_layout"):
        peft_to_kohya({}, LoraConfig(), family="sdxl")
    sdxl = metadata(base_model_version="sdxl_base_v1-0")
    assert sdxl["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert sdxl["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
