"""Conditioning beyond text, piece by piece: U-Net widening, one-hot maps, aligned data, guidance, configs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune.conditioning.semantic import one_hot_resized
from sdtune.config import ConfigError, validate
from sdtune.data.records import DataError
from sdtune.models.expand import expand_unet_input
from sdtune.sampling import combine_guidance, guidance_plan

# ---- the widened U-Net -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_unet(tiny_dir):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_dir / "unet").eval()


@torch.no_grad()
def test_zero_initialised_expansion_keeps_the_output(tiny_unet) -> None:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    extra = torch.randn(2, 7, 8, 8, generator=generator)
    context = torch.randn(2, 77, tiny_unet.config.cross_attention_dim, generator=generator)
    t = torch.tensor([10, 900])
    original = tiny_unet(latents, t, encoder_hidden_states=context).sample

    widened = copy.deepcopy(tiny_unet)
    assert expand_unet_input(widened, 11)
    assert widened.config.in_channels == 11 and widened.conv_in.weight.shape[1] == 11
    assert not expand_unet_input(widened, 11), "an already widened U-Net is left as it is"
    out = widened(torch.cat([latents, extra], 1), t, encoder_hidden_states=context).sample
    torch.testing.assert_close(out, original, atol=1e-6, rtol=1e-5)

    with torch.no_grad():  # the check above must fail when the new channels do contribute
        widened.conv_in.weight[:, 4:].fill_(0.01)
    moved = widened(torch.cat([latents, extra], 1), t, encoder_hidden_states=context).sample
    assert (moved - original).abs().max() > 1e-3


def test_narrowing_is_refused(tiny_unet) -> None:
    with pytest.raises(ConfigError, match="input channels"):
        expand_unet_input(copy.deepcopy(tiny_unet), 3)


# ---- one-hot maps ------------------------------------------------------------------------------------------


def test_one_hot_resizing_keeps_class_boundaries() -> None:
    labels = torch.full((1, 64, 64), 2)
    labels[:, :, :21] = 1  # boundary at pixel column 21: not on an 8-pixel block edge
    labels[:, 40:48] = 255  # an ignored band
    one_hot = one_hot_resized(labels, num_classes=3, size=(8, 8), ignore_index=255, mode="nearest")
    assert one_hot.shape == (1, 3, 8, 8)
    assert set(one_hot.unique().tolist()) <= {0.0, 1.0}, "nearest-neighbour never blends classes"
    # Each latent pixel takes the class at the centre of its 8x8 block (pixel 8i + 4).
    centres = labels[0, 4::8, 4::8]
    for cls in range(3):
        torch.testing.assert_close(one_hot[0, cls], (centres == cls).float())
    assert one_hot[0, :, 5].sum() == 0, "ignore_index rows become all-zero vectors"
    # Block centres 4, 12, 20 lie left of the boundary at 21: the class edge stays where it was (21/8 ≈ 2.6).
    assert torch.equal(one_hot[0, 1, 0], torch.tensor([1.0, 1, 1, 0, 0, 0, 0, 0]))


def test_area_resizing_keeps_where_a_boundary_lies_inside_a_block() -> None:
    labels = torch.full((1, 64, 64), 2)
    labels[:, :, :21] = 1  # columns 16..20 of block 2 (16..23) are class 1: 5 of its 8 columns
    labels[:, 40:44] = 255  # half of block row 5 ignored
    shares = one_hot_resized(labels, num_classes=3, size=(8, 8), ignore_index=255, mode="area")
    assert shares.shape == (1, 3, 8, 8)
    torch.testing.assert_close(shares[0, 1, 0], torch.tensor([1.0, 1, 5 / 8, 0, 0, 0, 0, 0]))
    torch.testing.assert_close(shares[0, 2, 0], torch.tensor([0.0, 0, 3 / 8, 1, 1, 1, 1, 1]))
    assert shares[0, 0].sum() == 0
    torch.testing.assert_close(shares[0, :, 5].sum(0), torch.full((8,), 0.5))  # ignored pixels: no class
    torch.testing.assert_close(shares[0, :, 0].sum(0), torch.ones(8))


# ---- semantic data -----------------------------------------------------------------------------------------


def write_pair(root: Path, stem: str, labels: np.ndarray, image_size: tuple[int, int] | None = None) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "maps").mkdir(parents=True, exist_ok=True)
    size = image_size or (labels.shape[1], labels.shape[0])
    Image.new("RGB", size, (10, 10, 10)).save(root / "images" / f"{stem}.jpg")
    Image.fromarray(labels.astype(np.uint8)).save(root / "maps" / f"{stem}.png")


def semantic_dm(root: Path, **kwargs):
    from sdtune.data.semantic import SemanticMapDataModule

    return SemanticMapDataModule(
        name="semantic", root=str(root), resolution=16, batch_size=2, num_classes=7, **kwargs
    )


def test_bad_maps_are_listed_by_file_before_training(tmp_path: Path) -> None:
    good = np.zeros((16, 16), np.uint8)
    good[4:8, 4:8] = 3
    good[0, 0] = 255  # ignore_index is allowed
    write_pair(tmp_path, "good", good)
    out_of_range = good.copy()
    out_of_range[10, 10] = 9
    write_pair(tmp_path, "bad_class", out_of_range)
    write_pair(tmp_path, "bad_size", good, image_size=(16, 20))
    Image.new("RGB", (16, 16)).save(tmp_path / "images" / "no_map.jpg")
    (tmp_path / "images" / "good.txt").write_text("a green square")

    with pytest.raises(DataError) as info:
        semantic_dm(tmp_path).setup()
    message = str(info.value)
    assert "3 bad sample(s)" in message
    assert "maps/bad_class.png" in message and "[9]" in message and "num_classes=7" in message
    assert "maps/bad_size.png" in message and "16x20" in message
    assert "images/no_map.jpg" in message and "no label map" in message

    dm = semantic_dm(tmp_path, on_bad_sample="skip")
    dm.setup()
    assert dm.num_samples == 1 and len(dm.skipped) == 3
    sample = dm.dataset[0]
    assert sample["caption"] == "a green square"
    assert sample["map"].dtype == torch.int64 and sample["map"].shape == (16, 16)
    assert sample["map"][5, 5] == 3 and sample["map"][0, 0] == 255


def test_a_folder_without_images_is_named_not_offered_a_skip(tmp_path: Path) -> None:
    (tmp_path / "maps").mkdir()
    with pytest.raises(DataError) as info:
        semantic_dm(tmp_path, on_bad_sample="skip").setup()
    message = str(info.value)
    assert f"data.root {tmp_path}" in message and "no images under images/" in message
    assert "on_bad_sample" not in message


def test_rgb_maps_with_a_palette(tmp_path: Path) -> None:
    from sdtune.data.semantic import MapError, load_palette, read_label_map

    palette_file = tmp_path / "palette.json"
    palette_file.write_text(json.dumps([[0, 0, 0], [255, 0, 0], [0, 0, 255]]))
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[:2, :, 0] = 255
    rgb[3, 3] = (0, 0, 255)
    Image.fromarray(rgb).save(tmp_path / "map.png")
    labels = read_label_map(tmp_path / "map.png", load_palette(palette_file))
    assert labels.tolist() == [[1] * 4, [1] * 4, [0] * 4, [0, 0, 0, 2]]
    rgb[0, 0] = (1, 2, 3)
    Image.fromarray(rgb).save(tmp_path / "map.png")
    with pytest.raises(MapError, match=r"\(1, 2, 3\) is not in data.palette"):
        read_label_map(tmp_path / "map.png", load_palette(palette_file))
    with pytest.raises(MapError, match="data.palette"):
        read_label_map(tmp_path / "map.png")  # RGB without a palette


def test_random_crop_and_flip_are_the_same_for_image_and_map(tmp_path: Path) -> None:
    """A red band in the image and class 1 in the map stay aligned through every random crop and flip."""
    from sdtune.data.joint import JointTransform

    labels = np.zeros((16, 48), np.uint8)  # the short side is the resolution: crops, no resampling blur
    labels[:, 5:13] = 1
    image = np.zeros((16, 48, 3), np.uint8)
    image[:, 5:13] = (255, 0, 0)

    transform = JointTransform(16, center_crop=False, random_flip=True)
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        pixels, aligned = transform(Image.fromarray(image), labels={"map": labels})
        red = pixels[0] > 0
        assert torch.equal(red, aligned["map"] == 1)
        seen.add((bool(red[:, 0].all()), int(red.sum())))
    assert len({left for left, _ in seen}) == 2, "both flips occurred"
    assert len({count for _, count in seen}) > 2, "crops varied"


# ---- edit pairs and representation vectors -----------------------------------------------------------------


def test_bad_pairs_are_listed_by_file(tmp_path: Path) -> None:
    from sdtune.data.pairs import EditPairsDataModule

    for name, size in (("a", (16, 16)), ("b", (16, 16)), ("c", (24, 16))):
        Image.new("RGB", size, (200, 0, 0)).save(tmp_path / f"{name}.png")
    lines = [
        {"source": "a.png", "target": "b.png", "instruction": "make it blue"},
        {"source": "c.png", "target": "b.png", "instruction": "make it red"},
        {"source": "a.png", "target": "missing.png", "instruction": "x"},
        {"source": "a.png", "target": "b.png", "instruction": " "},
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    dm = EditPairsDataModule(name="pairs", root=str(tmp_path), resolution=16, batch_size=2)
    with pytest.raises(DataError) as info:
        dm.setup()
    message = str(info.value)
    assert "3 bad sample(s)" in message
    assert "c.png: source is 24x16 but target b.png is 16x16" in message
    assert "missing.png: image does not exist" in message and "empty instruction" in message


def test_a_pairs_folder_without_metadata_is_named_not_offered_a_skip(tmp_path: Path) -> None:
    from sdtune.data.pairs import EditPairsDataModule

    dm = EditPairsDataModule(
        name="pairs", root=str(tmp_path), resolution=16, batch_size=2, on_bad_sample="skip"
    )
    with pytest.raises(DataError) as info:
        dm.setup()
    message = str(info.value)
    assert f"data.root {tmp_path}: no metadata.jsonl" in message and "'instruction'" in message
    assert "on_bad_sample" not in message


def test_missing_or_misshapen_vectors_are_listed(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from sdtune.data.representation import RepresentationDataModule

    for name in ("a", "b", "c", "d"):
        Image.new("RGB", (16, 16)).save(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text(f"caption {name}")
    np.save(tmp_path / "a.npy", np.ones(5, np.float32))
    save_file({"emb": torch.ones(2, 5)}, str(tmp_path / "b.safetensors"))
    np.save(tmp_path / "c.npy", np.ones(4, np.float32))
    dm = RepresentationDataModule(
        name="representation", root=str(tmp_path), resolution=16, batch_size=2, representation_dim=5
    )
    with pytest.raises(DataError) as info:
        dm.setup()
    message = str(info.value)
    assert "c.npy: vector has shape (4,)" in message and "d.png: no representation vector" in message
    assert "a.png" not in message and "b.safetensors" not in message


# ---- guidance ----------------------------------------------------------------------------------------------


def test_guidance_plan_reduces_to_classifier_free_guidance_and_instruct_pix2pix() -> None:
    e = {
        frozenset(): torch.tensor(1.0),
        frozenset({"source"}): torch.tensor(3.0),
        frozenset({"source", "text"}): torch.tensor(10.0),
    }

    levels, scales = guidance_plan(["text", "source"], 7.5)
    assert levels == [set(), {"text", "source"}] and scales == [7.5]
    got = combine_guidance([e[frozenset(k)] for k in levels], scales)
    assert got == 1.0 + 7.5 * (10.0 - 1.0)

    levels, scales = guidance_plan(["text", "source"], 7.5, {"source": 1.5})
    assert levels == [set(), {"source"}, {"source", "text"}] and scales == [1.5, 7.5]
    got = combine_guidance([e[frozenset(k)] for k in levels], scales)
    assert got == 1.0 + 1.5 * (3.0 - 1.0) + 7.5 * (10.0 - 3.0)  # diffusers' InstructPix2Pix formula

    assert guidance_plan(["text"], 1.0) == ([{"text"}], [])
    with pytest.raises(ValueError, match="unknown condition"):
        guidance_plan(["text"], 5.0, {"map": 2.0})


# ---- config validation -------------------------------------------------------------------------------------


def test_concat_conditioning_refuses_lora_only_exports_up_front(train_cfg) -> None:
    with pytest.raises(ConfigError) as info:
        validate(train_cfg("+experiment=semantic", "export.formats=[diffusers,kohya,single_file]"))
    message = str(info.value)
    assert "['diffusers', 'kohya'] hold only LoRA weights" in message and "export.formats=[merged]" in message
    assert "single_file cannot hold" in message
    validate(train_cfg("+experiment=semantic"))  # the experiment itself is valid


def test_conditioning_and_data_must_fit(train_cfg) -> None:
    with pytest.raises(ConfigError) as info:
        validate(
            train_cfg(
                "+experiment=semantic",
                "data=dreambooth",
                "sampling.condition_guidance={sketch: 2.0}",
                "conditioning.map.resize=bilinear",
            )
        )
    message = str(info.value)
    assert "conditioning.map.resize: 'bilinear'; valid: nearest, area" in message
    assert "conditioning.map: reads batch key 'map', which data=dreambooth does not provide" in message
    assert "sampling.condition_guidance: unknown condition(s) ['sketch']" in message
    assert "sampling.from_data: data=dreambooth cannot serve conditions" in message
    # conditioning=… picks its data config, so the one-liners compose as they are
    assert train_cfg("conditioning=representation").data.name == "representation"
    assert train_cfg("+experiment=image_edit").data.name == "pairs"
