"""Textual inversion: only the new embedding rows train; exports reload with diffusers and drive sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

from sdtune.sample import sample
from sdtune.train import train

from .conftest import compose_config


@pytest.fixture(scope="module")
def ti_run(tmp_path_factory, cache_dir):
    run_dir = tmp_path_factory.mktemp("ti") / "run"
    cfg = compose_config(
        "train",
        [
            "+experiment=textual_inversion",
            "method.num_vectors=2",
            "method.lr=5e-2",
            "trainer.max_steps=3",
            "data.num_images=8",
            "data.batch_size=4",
            "sampling.every_n_steps=0",
            "sampling.steps=1",
            "sampling.per_prompt=1",
            "logger=none",
        ],
        run_dir,
    )
    run = train(cfg)
    run.module.eval()
    return run


def test_only_the_new_rows_change(ti_run, tiny_dir) -> None:
    base = StableDiffusionPipeline.from_pretrained(tiny_dir)
    trainable = ti_run.module.trainable_parameters()
    assert len(trainable) == 1 and next(iter(trainable)).endswith("token_embedding.weight")
    trained = next(iter(trainable.values())).detach()
    original = base.text_encoder.get_input_embeddings().weight
    assert trained.shape[0] == original.shape[0] + 2
    assert torch.equal(trained[: original.shape[0]], original)
    tokenizer = ti_run.module.stack.tokenizer
    init = original[tokenizer.convert_tokens_to_ids("shape</w>")]
    new = trained[tokenizer.convert_tokens_to_ids(["<sks>", "<sks>_1"])]
    assert (new - init).abs().max() > 1e-4  # the rows moved away from their initialiser
    for name, p in ti_run.module.named_parameters():
        if name not in trainable:
            assert not p.requires_grad


def test_exports_reload_through_diffusers(ti_run, tiny_dir) -> None:
    stack = ti_run.module.stack
    conditioner = ti_run.module.conditioning.components["text"]
    want = conditioner.encode(["a red <sks> on a gray background"])
    learned = load_file(ti_run.run_dir / "embeddings/learned_embeds.safetensors")
    assert set(learned) == {"<sks>"} and learned["<sks>"].shape == (2, 64)
    a1111 = load_file(ti_run.run_dir / "embeddings/sks.safetensors")
    assert torch.equal(a1111["emb_params"], learned["<sks>"])
    for path, token in (
        (ti_run.run_dir / "embeddings/learned_embeds.safetensors", None),
        (ti_run.run_dir / "embeddings/sks.safetensors", "<sks>"),
    ):
        pipe = StableDiffusionPipeline.from_pretrained(tiny_dir)
        pipe.load_textual_inversion(str(path), token=token)
        prompt = pipe.maybe_convert_prompt("a red <sks> on a gray background", pipe.tokenizer)
        ids = pipe.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
        torch.testing.assert_close(pipe.text_encoder(ids)[0], want, atol=1e-5, rtol=1e-4)
    assert stack.placeholders == {"<sks>": ["<sks>", "<sks>_1"]}


def test_sample_uses_the_token(ti_run, tmp_path) -> None:
    common = ["prompt='a red <sks> on a gray background'", "steps=2", "scheduler=ddim"]
    with_run = sample(
        compose_config("sample", [f"source={ti_run.run_dir}", *common, f"out={tmp_path}/a.png"])
    )
    base = sample(compose_config("sample", ["source=tiny", *common, f"out={tmp_path}/b.png"]))
    file = sample(
        compose_config(
            "sample",
            [
                "source=tiny",
                *common,
                f"out={tmp_path}/c.png",
                f"embedding={ti_run.run_dir / 'embeddings/sks.safetensors'}",
                "token='<sks>'",
            ],
        )
    )
    a, b, c = (np.asarray(Image.open(p[0])) for p in (with_run, base, file))
    assert np.array_equal(a, c)  # the run and its A1111 file give the same image
    assert not np.array_equal(a, b)  # the embedding changes the image
