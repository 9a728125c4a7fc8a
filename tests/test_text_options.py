"""Clip skip and max_token_length (kohya's options): what is read, cached and sampled."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline
from omegaconf import OmegaConf

from sdtune.conditioning import build_conditioning
from sdtune.config import ConfigError, validate
from sdtune.data.cache import prepare_cache
from sdtune.sample import check, source_configs

from .conftest import compose_config
from .test_cache import CAPTIONS, datamodule, write_folder


def text_conditioner(stack, clip_skip: int = 1, max_token_length: int = 75):
    options = {"clip_skip": clip_skip, "max_token_length": max_token_length}
    cfg = {"text": {"_target_": "sdtune.conditioning.text.TextConditioner", **options}}
    return build_conditioning(OmegaConf.create(cfg), stack).components["text"]


def test_clip_skip_2_is_the_penultimate_layer_through_the_final_norm(stack, tiny_dir) -> None:
    """What diffusers' `encode_prompt(clip_skip=1)` and sd-scripts' `--clip_skip 2` compute (diffusers counts
    the layers skipped); done by hand, since that diffusers path still reads transformers 4's `text_model`."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir)
    encoder = pipe.text_encoder
    ids = pipe.tokenizer(CAPTIONS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        last = text_conditioner(stack, 1).encode(CAPTIONS)
        penultimate = text_conditioner(stack, 2).encode(CAPTIONS)
        want_last, _ = pipe.encode_prompt(CAPTIONS, "cpu", 1, False)
        layers = encoder(ids.input_ids, output_hidden_states=True).hidden_states
        norm = getattr(encoder, "text_model", encoder).final_layer_norm
        want_penultimate = norm(layers[-2])
    assert len(layers) == 3  # embeddings + the tiny encoder's 2 layers
    torch.testing.assert_close(last, want_last, rtol=0, atol=1e-6)
    torch.testing.assert_close(penultimate, want_penultimate, rtol=0, atol=1e-6)
    assert (penultimate - last).abs().max() > 1e-2


def test_clip_skip_beyond_the_encoder_is_named(stack) -> None:
    with pytest.raises(ConfigError, match=r"conditioning.text.clip_skip: got 3, .* 2 layers; use 1"):
        text_conditioner(stack, 3)


def test_the_text_cache_holds_the_skipped_layer_and_keys_it(tmp_path, stack) -> None:
    data = write_folder(tmp_path / "data")
    skip2 = text_conditioner(stack, 2)
    conditioning = build_conditioning(
        OmegaConf.create({"text": {"_target_": "sdtune.conditioning.text.TextConditioner", "clip_skip": 2}}),
        stack,
    )
    report = prepare_cache(datamodule(data), stack, conditioning, tmp_path / "c", torch.device("cpu"), 4)
    assert report.text_built == 5
    dm = datamodule(data)
    prepare_cache(dm, stack, conditioning, tmp_path / "c", torch.device("cpu"), 4)
    with torch.no_grad():
        want = skip2.encode(CAPTIONS)
    for i in range(4):
        assert torch.equal(dm.dataset[i]["caption_embeds"], want[i])
    last = build_conditioning(
        OmegaConf.create({"text": {"_target_": "sdtune.conditioning.text.TextConditioner"}}), stack
    )
    again = prepare_cache(datamodule(data), stack, last, tmp_path / "c", torch.device("cpu"), 4)
    assert (again.text_built, again.text_reused) == (5, 0), "clip skip 1 must not read clip skip 2's entries"


def test_sampling_takes_the_runs_clip_skip_or_the_override(tmp_path) -> None:
    base = compose_config("sample", ["source=tiny", "prompt=a red star", f"out={tmp_path}/a.png"])
    assert source_configs(base)[1].text.get("clip_skip", 1) == 1
    skip = compose_config("sample", ["source=tiny", "prompt=a", f"out={tmp_path}/a.png", "clip_skip=2"])
    assert source_configs(skip)[1].text.clip_skip == 2
    longer = compose_config(
        "sample", ["source=tiny", "prompt=a", f"out={tmp_path}/a.png", "max_token_length=150"]
    )
    assert source_configs(longer)[1].text.max_token_length == 150
    bad = compose_config(
        "sample", ["source=tiny", "prompt=a", f"out={tmp_path}/a.png", "max_token_length=80"]
    )
    with pytest.raises(ConfigError, match=r"max_token_length: got 80; use null, 75, 150 or 225"):
        check(bad)


def test_train_config_checks_clip_skip(train_cfg) -> None:
    validate(train_cfg("conditioning.text.clip_skip=2"))
    with pytest.raises(ConfigError, match=r"conditioning.text.clip_skip: must be an integer >= 1"):
        validate(train_cfg("conditioning.text.clip_skip=0"))
    with pytest.raises(ConfigError, match=r"clip_skip: SDXL always reads its encoders' penultimate"):
        validate(train_cfg("model=tiny_xl", "conditioning.text.clip_skip=2"))
    with pytest.raises(ConfigError, match=r"max_token_length: SDXL reads 75 tokens so far"):
        validate(train_cfg("model=tiny_xl", "conditioning.text.max_token_length=150"))


WORDS = ["red", "blue", "green", "circle", "square", "star", "gray", "white"]
LONG = ", ".join(WORDS[i % 8] for i in range(100))  # ≈ 200 tokens


def test_long_captions_are_read_in_chunks_of_75(stack) -> None:
    text = text_conditioner(stack, max_token_length=150)
    tokenizer = stack.tokenizer
    ids = text.token_ids([LONG, "a red star"])
    assert ids.shape == (2, 154)
    chunks = ids.reshape(2, 2, 77)
    assert (chunks[:, :, 0] == tokenizer.bos_token_id).all() and (
        chunks[:, :, -1] == tokenizer.eos_token_id
    ).all()
    plain = tokenizer(LONG, truncation=False).input_ids[1:-1]
    assert chunks[0, :, 1:-1].reshape(-1).tolist() == plain[:150]
    with torch.no_grad():
        long_hidden = text.encode([LONG])
        short_hidden = text_conditioner(stack).encode([LONG])
    assert long_hidden.shape[:2] == (1, 152) and short_hidden.shape[:2] == (1, 77)
    # The first chunk is what the 75-token encoder reads (BOS + the first 75 tokens).
    torch.testing.assert_close(long_hidden[:, :76], short_hidden[:, :76], rtol=0, atol=1e-6)


def test_words_past_75_tokens_change_the_condition_only_with_a_longer_limit(stack) -> None:
    head = ", ".join(WORDS[i % 8] for i in range(60))  # ≈ 120 tokens: the change lands in the second chunk
    a, b = head + ", red, red, red", head + ", blue, blue, blue"
    with torch.no_grad():
        short = text_conditioner(stack).encode([a, b])
        long = text_conditioner(stack, max_token_length=150).encode([a, b])
    assert torch.equal(short[0], short[1])
    assert (long[0] - long[1]).abs().max() > 1e-3


def test_training_and_sampling_with_225_tokens(tmp_path, train_cfg) -> None:
    from safetensors import safe_open

    from sdtune.sample import sample
    from sdtune.train import train

    run_dir = tmp_path / "run"
    common = ["+experiment=lora", "data.num_images=4", "data.batch_size=2", "trainer.max_steps=2"]
    common += ["sampling.prompts=[]", "logger=none", "runtime.threads=1", "data.cache_latents=true"]
    train(train_cfg(*common, "conditioning.text.max_token_length=225", run_dir=run_dir))
    with safe_open(str(run_dir / "lora" / "kohya.safetensors"), "pt") as f:
        assert f.metadata()["ss_max_token_length"] == "225"
    args = [f"source={run_dir}", f"prompt='{LONG}'", "steps=2", f"out={tmp_path / 'a.png'}"]
    (image,) = sample(compose_config("sample", args))
    assert image.is_file()
    with pytest.raises(ConfigError, match=r"conditioning.text.max_token_length: got 100; use 75, 150 or 225"):
        validate(train_cfg("conditioning.text.max_token_length=100"))
