"""Tag shuffling (kohya's --shuffle_caption / --keep_tokens): kept tags in front, order per sample seed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from sdtune.conditioning import build_conditioning
from sdtune.config import ConfigError, validate
from sdtune.data.cache import prepare_cache
from sdtune.data.captions import TagAugment
from sdtune.data.datamodule import ImageCaptionDataModule

TAGS = "sks, 1girl, red hair, smiling, outdoors, night"


def test_keep_tokens_stay_in_front_and_no_tag_is_lost() -> None:
    shuffle = TagAugment(keep_tokens=2)
    orders = set()
    for seed in range(40):
        out = shuffle(TAGS, torch.Generator().manual_seed(seed))
        tags = out.split(", ")
        assert tags[:2] == ["sks", "1girl"], out
        assert sorted(tags) == sorted(t.strip() for t in TAGS.split(","))
        orders.add(out)
    assert len(orders) > 10  # 4! = 24 orders of the other tags
    again = shuffle(TAGS, torch.Generator().manual_seed(7))
    assert again == shuffle(TAGS, torch.Generator().manual_seed(7))


def test_tag_dropout_leaves_tags_out_but_never_the_kept_ones() -> None:
    thin = TagAugment(keep_tokens=1, shuffle=False, tag_dropout=0.5)
    all_tags = [t.strip() for t in TAGS.split(",")]
    lengths = []
    for seed in range(200):
        tags = thin(TAGS, torch.Generator().manual_seed(seed)).split(", ")
        assert tags[0] == "sks" and tags == [t for t in all_tags if t in tags]  # order kept without shuffle
        lengths.append(len(tags) - 1)
    assert 2.0 < sum(lengths) / len(lengths) < 3.0  # 5 droppable tags at p = 0.5: 2.5 on average
    assert TagAugment(shuffle=False)(TAGS) == TAGS


def test_another_separator_and_empty_tags() -> None:
    out = TagAugment(keep_tokens=1, separator="|")("a| b ||c", torch.Generator().manual_seed(0))
    assert out.split("| ")[0] == "a" and sorted(out.split("| ")) == ["a", "b", "c"]


def _folder(root: Path, count: int = 4) -> Path:
    root.mkdir()
    lines = []
    for i in range(count):
        Image.new("RGB", (64, 64), (40 * i, 0, 0)).save(root / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"tok{i}, {TAGS}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _captions_by_epoch(root: Path, epochs: int, **kwargs) -> list[dict[str, str]]:
    dm = ImageCaptionDataModule(
        name="captions", root=str(root), resolution=64, batch_size=2, shuffle_seed=3, **kwargs
    )
    dm.setup("fit")
    sampler_epochs = []
    loader = dm.train_dataloader()
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        seen = {}
        for batch in loader:
            for caption in batch["caption"]:
                seen[caption.split(", ")[0]] = caption
        sampler_epochs.append(seen)
    return sampler_epochs


def test_the_dataloader_shuffles_each_epoch_the_same_way_on_every_run(tmp_path) -> None:
    root = _folder(tmp_path / "data")
    shuffled = _captions_by_epoch(root, 3, shuffle_caption=True, keep_tokens=2)
    for epoch in shuffled:
        assert len(epoch) == 4
        for caption in epoch.values():
            assert caption.split(", ")[1] == "sks", caption  # tok{i}, sks kept in front
    assert shuffled[0] != shuffled[1] or shuffled[1] != shuffled[2], "the order must change between epochs"
    assert _captions_by_epoch(root, 3, shuffle_caption=True, keep_tokens=2) == shuffled  # reproducible
    plain = _captions_by_epoch(root, 1)
    assert plain[0] == {f"tok{i}": f"tok{i}, {TAGS}" for i in range(4)}
    (thinned,) = _captions_by_epoch(root, 1, caption_tag_dropout=0.9, keep_tokens=1)
    assert sorted(thinned) == [f"tok{i}" for i in range(4)]
    assert sum(len(c.split(", ")) for c in thinned.values()) < 4 * 4  # of 4 × 7 tags, ≈ 4 × 1.6 remain


def test_shuffle_config_is_checked(train_cfg, tmp_path) -> None:
    root = _folder(tmp_path / "data")
    validate(
        train_cfg("data=captions", f"data.root={root}", "data.shuffle_caption=true", "data.keep_tokens=1")
    )
    with pytest.raises(ConfigError) as info:
        validate(
            train_cfg(
                "data=captions",
                f"data.root={root}",
                "data.shuffle_caption=yes",
                "data.keep_tokens=-1",
                "data.caption_separator=' '",
            )
        )
    message = str(info.value)
    assert "data.shuffle_caption" in message and "data.keep_tokens" in message
    assert "data.caption_separator" in message


def test_shuffled_captions_are_not_cached_but_shuffled_from_the_cache(tmp_path, stack) -> None:
    text = {"text": {"_target_": "sdtune.conditioning.text.TextConditioner"}}
    conditioning = build_conditioning(OmegaConf.create(text), stack)
    root = _folder(tmp_path / "data")
    dm = ImageCaptionDataModule(
        name="captions", root=str(root), resolution=64, batch_size=2, shuffle_caption=True, keep_tokens=1
    )
    dm.setup("fit")
    report = prepare_cache(dm, stack, conditioning, tmp_path / "cache", torch.device("cpu"), batch_size=4)
    assert not report.text_cached and any("data.shuffle_caption" in note for note in report.notes)
    captions = [c for batch in dm.train_dataloader() for c in batch["caption"]]
    assert "latent_moments" in next(iter(dm.train_dataloader()))  # trained from the latent cache
    assert sorted(c.split(", ")[0] for c in captions) == [f"tok{i}" for i in range(4)]
    assert any(c.split(", ")[1:] != [t.strip() for t in TAGS.split(",")] for c in captions)
