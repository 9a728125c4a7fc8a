"""The latent/text cache: exact hits, misses on every change, damaged entries rebuilt, cached training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from sdtune.conditioning import build_conditioning
from sdtune.data.cache import CacheError, prepare_cache, read_entry
from sdtune.data.datamodule import ImageCaptionDataModule
from sdtune.data.transforms import ImageTransform
from sdtune.module import DiffusionModule

CAPTIONS = ["a red circle", "a blue square", "a green star", "a purple cross"]


def write_folder(
    root: Path, captions: list[str] = CAPTIONS, sizes: list[tuple[int, int]] | None = None
) -> Path:
    """A metadata.jsonl image folder with one random image per caption."""
    root.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    lines = []
    for i, caption in enumerate(captions):
        width, height = sizes[i] if sizes else (80, 64)
        pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(root / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": caption}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def conditioning(stack):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"text": {"_target_": "sdtune.conditioning.text.TextConditioner", "dropout": 0.5}})
    return build_conditioning(cfg, stack)


def datamodule(
    root: Path, resolution: int = 64, random_flip: bool = True, **kwargs
) -> ImageCaptionDataModule:
    dm = ImageCaptionDataModule(
        name="captions",
        root=str(root),
        resolution=resolution,
        batch_size=4,
        random_flip=random_flip,
        **kwargs,
    )
    dm.setup("fit")
    return dm


def build(dm, stack, conditioning, cache_root: Path):
    return prepare_cache(dm, stack, conditioning, cache_root, torch.device("cpu"), batch_size=4)


def test_a_hit_returns_exactly_what_encoding_returns(tmp_path, stack, conditioning) -> None:
    dm = datamodule(write_folder(tmp_path / "data"))
    first = build(dm, stack, conditioning, tmp_path / "cache")
    assert (first.latents_built, first.text_built, first.text_cached) == (4, 5, True)  # 4 captions + ""
    again = datamodule(tmp_path / "data")
    second = build(again, stack, conditioning, tmp_path / "cache")
    assert (second.latents_built, second.latents_reused, second.text_built, second.text_reused) == (
        0,
        4,
        0,
        5,
    )

    transform = ImageTransform(64, center_crop=True, random_flip=False)
    pixels = torch.stack([transform(Image.open(tmp_path / "data" / f"{i}.png")) for i in range(4)])
    with torch.no_grad():
        moments = stack.vae.encode(pixels).latent_dist.parameters
        flipped = stack.vae.encode(torch.flip(pixels, dims=[-1])).latent_dist.parameters
        text = conditioning.components["text"]
        hidden = text.encode(CAPTIONS)
        null = text.encode([""])[0]
    dataset = again.dataset
    for i in range(4):
        entry = read_entry(*dataset.latents[i])
        assert torch.equal(entry["moments"], moments[i])
        assert torch.equal(entry["moments_flipped"], flipped[i])
        item = dataset[i]
        assert any(torch.equal(item["latent_moments"], m) for m in (moments[i], flipped[i]))
        assert torch.equal(item["caption_embeds"], hidden[i])
        assert torch.equal(item["negative_caption_embeds"], null)

    # The training step samples z0 from the cached moments exactly as encoding the pixels would.
    module = DiffusionModule(stack, conditioning, method=None, loss=_loss())
    torch.manual_seed(3)
    cached = module.batch_latents({"latent_moments": moments})
    torch.manual_seed(3)
    encoded = module.encode_latents(pixels)
    assert torch.equal(cached, encoded)

    # Caption dropout: dropped samples get the cached empty-caption embedding.
    drop = torch.tensor([True, False, True, False])
    batch = {"caption": CAPTIONS}
    live = conditioning(batch, {"text": drop}).crossattn
    batch_cached = {
        "caption": CAPTIONS,
        "caption_embeds": hidden,
        "negative_caption_embeds": null.expand_as(hidden),
    }
    torch.testing.assert_close(conditioning(batch_cached, {"text": drop}).crossattn, live, rtol=0, atol=1e-6)


def _loss():
    from omegaconf import OmegaConf

    return OmegaConf.create(
        {"prediction_type": None, "snr_gamma": None, "noise_offset": 0.0, "max_nonfinite_steps": 10}
    )


def test_changing_image_caption_resolution_or_model_misses(tmp_path, stack, conditioning) -> None:
    data, cache = write_folder(tmp_path / "data"), tmp_path / "cache"
    build(datamodule(data), stack, conditioning, cache)

    Image.new("RGB", (80, 64), (1, 2, 3)).save(data / "2.png")  # a changed image
    report = build(datamodule(data), stack, conditioning, cache)
    assert (report.latents_built, report.text_built) == (1, 0)

    write_folder(data, [*CAPTIONS[:3], "a yellow hexagon"])  # a changed caption (images rewritten alike)
    report = build(datamodule(data), stack, conditioning, cache)
    assert (report.latents_built, report.text_built) == (0, 1)  # image 2's first content is still cached

    assert build(datamodule(data, resolution=48), stack, conditioning, cache).latents_built == 4
    assert build(datamodule(data, random_flip=False), stack, conditioning, cache).latents_built == 4

    changed = [stack.vae.encoder.conv_in.bias, list(stack.text_encoder.parameters())[-1]]
    with torch.no_grad():  # a different base model: other VAE and text-encoder weights
        for weight in changed:
            weight.add_(1e-3)
    try:
        report = build(datamodule(data), stack, conditioning, cache)
    finally:
        with torch.no_grad():
            for weight in changed:
                weight.sub_(1e-3)
    assert (report.latents_built, report.text_built) == (4, 5)


def test_damaged_entries_are_detected_and_rebuilt(tmp_path, stack, conditioning) -> None:
    data, cache = write_folder(tmp_path / "data"), tmp_path / "cache"
    dm = datamodule(data)
    build(dm, stack, conditioning, cache)
    path, key = dm.dataset.latents[1]
    original = read_entry(path, key)

    path.write_bytes(path.read_bytes()[:-100])  # truncated (e.g. a copy cut short)
    report = build(datamodule(data), stack, conditioning, cache)
    assert (report.latents_built, report.latents_reused) == (1, 3)
    # Re-encoded alone rather than in a batch of 4: equal up to the convolution's summation order.
    torch.testing.assert_close(read_entry(path, key)["moments"], original["moments"], rtol=1e-4, atol=1e-5)

    raw = bytearray(path.read_bytes())  # same length, flipped bits: caught by the checksum when read
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CacheError, match="damaged; it has been deleted"):
        read_entry(path, key)
    assert not path.exists()
    assert build(datamodule(data), stack, conditioning, cache).latents_built == 1


def test_cached_bucketed_run_trains_end_to_end_without_the_encoders(train_cfg, monkeypatch, tmp_path) -> None:
    from sdtune.conditioning.text import TextConditioner
    from sdtune.train import train

    def refuse(*args, **kwargs):
        raise AssertionError("an encoder ran during cached training")

    monkeypatch.setattr(DiffusionModule, "encode_latents", refuse)
    monkeypatch.setattr(TextConditioner, "encode", refuse)
    sizes = [(96, 48)] * 4 + [(48, 96)] * 4
    root = write_folder(tmp_path / "data", [f"shape {i}" for i in range(8)], sizes)
    cfg = train_cfg(
        "+experiment=lora",
        "data=captions",
        f"data.root={root}",
        "data.batch_size=4",
        "data.num_workers=0",
        "data.random_flip=true",
        "data.bucketing=true",
        "data.cache_latents=true",
        f"data.latent_cache_dir={tmp_path / 'latents'}",
        "trainer.max_steps=3",
        "runtime.threads=1",
        "sampling.prompts=[]",
        "export.formats=[diffusers]",
        "logger=none",
    )
    run = train(cfg)
    assert run.trainer.global_step == 3
    assert len(list((tmp_path / "latents" / "latents").rglob("*.safetensors"))) == 8
    assert (run.run_dir / "lora" / "pytorch_lora_weights.safetensors").is_file()
    lora_b = [p for n, p in run.module.trainable_parameters().items() if "lora_B" in n]
    assert all(p.abs().sum() > 0 for p in lora_b)
    dm = run.trainer.datamodule
    assert len(set(dm.buckets.ids)) == 2  # a wide and a tall bucket, latents cached at each one's size
    for index in (0, 4):
        width, height = dm.buckets.size_of(index)
        assert dm.dataset[index]["latent_moments"].shape == (8, height // 8, width // 8)


def test_an_interrupted_build_resumes_and_concurrent_builders_build_once(
    tmp_path, stack, conditioning, monkeypatch
) -> None:
    import threading

    import sdtune.data.cache as cache_module

    data, cache = write_folder(tmp_path / "data"), tmp_path / "cache"
    written = []
    real_write = cache_module.write_entry

    def write_then_stop(path, key, tensors):
        if len(written) == 2:
            raise KeyboardInterrupt  # e.g. Ctrl-C halfway through the progress bar
        real_write(path, key, tensors)
        written.append(path)

    monkeypatch.setattr(cache_module, "write_entry", write_then_stop)
    with pytest.raises(KeyboardInterrupt):
        prepare_cache(datamodule(data), stack, conditioning, cache, torch.device("cpu"), batch_size=1)
    monkeypatch.setattr(cache_module, "write_entry", real_write)

    reports = []  # two processes (DDP ranks) at once: one builds the rest, the other waits and reuses it
    threads = [
        threading.Thread(target=lambda: reports.append(build(datamodule(data), stack, conditioning, cache)))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.latents_built for r in reports) == [0, 2]
    assert sorted(r.latents_reused for r in reports) == [2, 4]
