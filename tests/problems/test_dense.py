"""Dense problems: dilated ResNets, DeepLab heads, pixel metrics, Cityscapes and NYUv2.

The data sets cannot be downloaded here: tiny fixtures are written in exactly their file
formats (Cityscapes: 64×32 PNGs, 8-bit label IDs, 16-bit instance IDs and raw disparity;
NYUv2: MTAN's channels-last ``.npy`` files) with known labels, instances and disparities.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mtopt import Losses, MultiTaskOptimizer
from mtopt.problems import cityscapes as cs
from mtopt.problems.base import Problem, evaluate
from mtopt.problems.cityscapes import (
    CATEGORIES,
    CLASSES_19,
    Cityscapes,
    disparity_from_raw,
    instance_offsets,
    label_lookup,
    prepare_batch,
    thing_lookup,
)
from mtopt.problems.dense_models import (
    SMALL,
    DeepLabHead,
    DilatedResNet,
    angle_ratio,
    evaluate_pooled,
    iou_ratio,
    load_pretrained,
    masked_l1_ratio,
    per_sample_values,
    pixel_accuracy_ratio,
    pooled_value,
    resize_nearest,
    train_val_indices,
)
from mtopt.problems.nyuv2 import NYUv2, channels_first

Image = pytest.importorskip("PIL.Image")

# --------------------------------------------------------------------------------------------
# Cityscapes fixture: 64×32 frames with known regions
# --------------------------------------------------------------------------------------------

W0, H0 = 64, 32
ROAD, SKY, PARKING, PERSON, CAR, CARAVAN = 7, 23, 9, 24, 26, 29
CAR_A = (slice(4, 12), slice(8, 20))  # rows 4..11, cols 8..19, instance 26001
CAR_B = (slice(20, 28), slice(40, 48))  # instance 26002
PERSON_A = (slice(18, 30), slice(24, 28))  # instance 24000
CAR_GROUP = (slice(28, 32), slice(50, 60))  # instance ID = label ID 26: a group
CARAVAN_A = (slice(0, 4), slice(56, 64))  # 29000: has instances but ignored in eval
PARKING_A = (slice(28, 32), slice(0, 8))
RAW_DISPARITY = 2561  # (2561 − 1) / 256 = 10 px at 2048 wide
FAR_DISPARITY = 5121


def frame_maps(k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """RGB, label IDs, instance IDs, raw disparity of fixture frame ``k``."""
    rgb = np.random.default_rng(k).integers(0, 256, size=(H0, W0, 3), dtype=np.uint8)
    labels = np.full((H0, W0), SKY, dtype=np.uint8)
    labels[16:] = ROAD
    instances = labels.astype(np.uint16)
    for region, label, instance in (
        (CAR_A, CAR, 26001),
        (CAR_B, CAR, 26002),
        (PERSON_A, PERSON, 24000),
        (CAR_GROUP, CAR, CAR),
        (CARAVAN_A, CARAVAN, 29000),
        (PARKING_A, PARKING, PARKING),
    ):
        labels[region] = label
        instances[region] = instance
    disparity = np.full((H0, W0), RAW_DISPARITY, dtype=np.uint16)
    disparity[:2] = 0  # no measurement
    disparity[20:24, 0:8] = FAR_DISPARITY
    return rgb, labels, instances, disparity


FRAMES = {"train": [("aachen", 3), ("bochum", 3)], "val": [("frankfurt", 2)]}


def write_cityscapes(root: Path) -> Path:
    k = 0
    for split, cities in FRAMES.items():
        for city, count in cities:
            for j in range(count):
                stem = f"{city}_{j:06d}_000019"
                rgb, labels, instances, disparity = frame_maps(k)
                k += 1
                for sub, suffix, array in (
                    ("leftImg8bit", "leftImg8bit", rgb),
                    ("gtFine", "gtFine_labelIds", labels),
                    ("gtFine", "gtFine_instanceIds", instances),
                    ("disparity", "disparity", disparity),
                ):
                    folder = root / sub / split / city
                    folder.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(array).save(folder / f"{stem}_{suffix}.png")
    return root


@pytest.fixture(scope="module")
def city_root(tmp_path_factory) -> Path:
    return write_cityscapes(tmp_path_factory.mktemp("cityscapes"))


def city(root: Path, variant: str = "sdi19", shape=(W0, H0), **kwargs) -> Cityscapes:
    kwargs.setdefault("cache", root / "cache")
    return Cityscapes(variant, data_dir=root, shape=shape, augment=False, **kwargs, **SMALL)


def test_png_fixtures_have_the_cityscapes_bit_depths(city_root):
    folder = city_root / "gtFine" / "train" / "aachen"
    with Image.open(folder / "aachen_000000_000019_gtFine_labelIds.png") as im:
        assert im.mode == "L"
    with Image.open(folder / "aachen_000000_000019_gtFine_instanceIds.png") as im:
        assert im.mode.startswith("I")  # 16-bit grey
        assert int(np.asarray(im).max()) == 29000


def test_label_tables_follow_the_official_definitions():
    train_ids, categories = label_lookup(19), label_lookup(7)
    assert train_ids[CAR] == 13
    assert CLASSES_19[13] == "car"
    assert CATEGORIES[categories[CAR]] == "vehicle"
    assert train_ids[ROAD] == 0
    assert CATEGORIES[categories[ROAD]] == "flat"
    assert train_ids[PERSON] == 11
    assert CATEGORIES[categories[PERSON]] == "human"
    for ignored in (0, 6, PARKING, 10, 14, 15, 16, 18, CARAVAN, 30, 34, 255):
        assert train_ids[ignored] == -1
        assert categories[ignored] == -1
    assert sorted(set(train_ids[train_ids >= 0].tolist())) == list(range(19))
    assert sorted(set(categories[categories >= 0].tolist())) == list(range(7))
    things = np.flatnonzero(thing_lookup()).tolist()
    assert things == [24, 25, 26, 27, 28, 31, 32, 33]


def test_disparity_conversion():
    raw = np.array([0, 1, RAW_DISPARITY, FAR_DISPARITY], dtype=np.uint16)
    np.testing.assert_allclose(disparity_from_raw(raw, 2048), [0.0, 0.0, 10.0, 20.0])
    np.testing.assert_allclose(disparity_from_raw(raw, 256), [0.0, 0.0, 1.25, 2.5])


def test_loaded_targets_at_native_size(city_root):
    test = city(city_root, "sdi19").splits()["test"]
    batch = next(test.batches(2))
    s, d = batch["S"][0], batch["D"][0, 0]
    assert s[6, 10] == 13
    assert s[24, 42] == 13
    assert s[20, 25] == 11
    assert s[20, 2] == 0
    assert s[5, 2] == 10
    assert s[30, 2] == -1
    assert s[1, 60] == -1
    assert city(city_root, "sd7").splits()["test"].arrays["S"][0, 6, 10] == 6  # vehicle
    scale = 256 * 2048 / W0
    assert d[10, 10] == pytest.approx((RAW_DISPARITY - 1) / scale)
    assert d[21, 3] == pytest.approx((FAR_DISPARITY - 1) / scale)
    assert torch.all(batch["D"][:, :, :2] == 0)  # raw 0: invalid
    assert batch["x"].shape == (2, 3, H0, W0)
    assert batch["x"].dtype == torch.float32


def test_instance_offsets_point_from_the_centroid(city_root):
    batch = next(city(city_root, "sdi19").splits()["test"].batches(1))
    offsets, valid = batch["I"][0], batch["I_valid"][0, 0]
    # car A: rows 4..11, cols 8..19 → centroid (7.5, 13.5)
    assert offsets[:, 4, 8].tolist() == [4 - 7.5, 8 - 13.5]
    assert offsets[:, 11, 19].tolist() == [11 - 7.5, 19 - 13.5]
    # the car group (rows 28..31, cols 50..59) is one instance
    assert offsets[:, 28, 50].tolist() == [28 - 29.5, 50 - 54.5]
    assert valid[6, 10]
    assert valid[20, 25]
    assert valid[29, 55]
    assert not valid[1, 60]
    assert not valid[20, 2]
    assert not valid[30, 2]
    assert torch.all(offsets[:, ~valid] == 0)
    assert valid.sum() == 8 * 12 + 8 * 8 + 12 * 4 + 4 * 10


def test_instance_offsets_of_several_samples():
    inst = torch.zeros(2, 3, 4, dtype=torch.int16)
    inst[0, 0, :2] = 1  # (0, 0), (0, 1) → centroid (0, 0.5)
    inst[1, 1:, 3] = 1  # (1, 3), (2, 3) → centroid (1.5, 3)
    inst[1, 0, 0] = 2  # a single pixel: offset 0
    off = instance_offsets(inst)
    assert off[0, :, 0, 0].tolist() == [0.0, -0.5]
    assert off[0, :, 0, 1].tolist() == [0.0, 0.5]
    assert off[1, :, 1, 3].tolist() == [-0.5, 0.0]
    assert off[1, :, 2, 3].tolist() == [0.5, 0.0]
    assert off[1, :, 0, 0].tolist() == [0.0, 0.0]
    assert torch.count_nonzero(off) == 4  # Δx in sample 0, Δy in sample 1


def test_resize_halves_the_maps(city_root):
    problem = city(city_root, "sdi19", shape=(32, 16))
    batch = next(problem.splits()["test"].batches(1))
    assert batch["x"].shape == (1, 3, 16, 32)
    assert batch["S"].shape == (1, 16, 32)
    # nearest at pixel centres samples source rows/cols 2i + 1
    assert batch["D"][0, 0, 5, 5] == pytest.approx((RAW_DISPARITY - 1) / (256 * 2048 / 32))
    assert batch["S"][0, 3, 5] == 13
    # car A covers resized rows 2..5 and cols 4..9: centroid (3.5, 6.5)
    assert batch["I"][0, :, 2, 4].tolist() == [2 - 3.5, 4 - 6.5]
    assert set(batch["S"].unique().tolist()) <= {-1, 0, 10, 11, 13}


def test_resize_nearest_keeps_labels_integral():
    labels = np.random.default_rng(0).choice([7, 23, 26, 33], size=(32, 64)).astype(np.uint8)
    for shape in ((24, 10), (48, 20), (64, 32), (100, 70)):
        out = resize_nearest(labels, shape)
        assert out.shape == (shape[1], shape[0])
        assert out.dtype == np.uint8
        assert set(np.unique(out)) <= {7, 23, 26, 33}
    np.testing.assert_array_equal(resize_nearest(labels, (32, 16)), labels[1::2, 1::2])
    stacked = np.stack([labels, labels + 1])
    np.testing.assert_array_equal(
        resize_nearest(stacked, (24, 10))[1], resize_nearest(labels + 1, (24, 10))
    )


def test_split_is_deterministic_and_reproduces_the_reference(city_root):
    first, second = city(city_root).splits(), city(city_root).splits()
    assert [len(first[s]) for s in ("train", "val", "test")] == [4, 2, 2]
    for name in ("train", "val", "test"):
        for key, value in first[name].arrays.items():
            assert torch.equal(value, second[name].arrays[key])
    # official train frames are sorted by <city>/<stem> (frame k in writing order); the reference
    # permutes them with RandomState(0) and keeps the first int(0.8·n) for training
    official = [frame_maps(k)[0].transpose(2, 0, 1) for k in range(6)]
    order = np.random.RandomState(0).permutation(6)
    for position, k in enumerate(order):
        split, i = ("train", position) if position < 4 else ("val", position - 4)
        np.testing.assert_array_equal(first[split].arrays["x"][i].numpy(), official[k])
    train, val = train_val_indices(2975, 0.8)
    assert len(train) == 2380
    assert len(val) == 595
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(2975))


def test_second_load_comes_from_the_cache(city_root, tmp_path, monkeypatch):
    city(city_root, cache=tmp_path).splits()
    assert list((tmp_path / "cityscapes").glob("train_64x32_*/image.npy"))

    def fail(*args, **kwargs):
        raise AssertionError("read a PNG although the cache exists")

    monkeypatch.setattr(cs, "read_sample", fail)
    again = city(city_root, cache=tmp_path).splits()
    assert len(again["train"]) == 4
    with pytest.raises(AssertionError, match="read a PNG"):
        city(city_root, shape=(32, 16), cache=tmp_path).splits()  # another shape: no cache


def test_missing_files_name_the_expected_layout(tmp_path, monkeypatch):
    monkeypatch.delenv("MTOPT_CITYSCAPES", raising=False)
    with pytest.raises(FileNotFoundError, match=r"leftImg8bit/\{train,val\}/<city>"):
        Cityscapes("sd7", data_dir=tmp_path).splits()
    with pytest.raises(FileNotFoundError, match="MTOPT_CITYSCAPES"):
        Cityscapes("sd7").splits()
    root = write_cityscapes(tmp_path / "partial")
    next((root / "disparity" / "train").glob("*/*.png")).unlink()
    with pytest.raises(FileNotFoundError, match=r"_disparity\.png"):
        Cityscapes("sd7", data_dir=root, cache=tmp_path / "cache").splits()
    with pytest.raises(ValueError, match="variant"):
        Cityscapes("sdx")


def test_flip_augmentation_mirrors_maps_and_offsets(city_root):
    raw = city(city_root).splits()["test"].arrays
    plain = prepare_batch(raw)
    flip = torch.tensor([[0.0, -1.0, 0.0], [0.0, -1.0, 0.0]])
    flipped = prepare_batch(raw, augment_params=flip, train=True)
    torch.testing.assert_close(flipped["x"], plain["x"].flip(-1))
    assert torch.equal(flipped["S"], plain["S"].flip(-1))
    assert torch.equal(flipped["D"], plain["D"].flip(-1))
    assert torch.equal(flipped["I_valid"], plain["I_valid"].flip(-1))
    mirrored = plain["I"].flip(-1) * torch.tensor([1.0, -1.0]).view(1, 2, 1, 1)
    torch.testing.assert_close(flipped["I"], mirrored)


def test_rotation_invalidates_the_corners(city_root):
    raw = city(city_root).splits()["test"].arrays
    turn = torch.tensor([[math.radians(10.0), 1.0, 0.0]] * 2)
    rotated = prepare_batch(raw, augment_params=turn, train=True)
    assert torch.all(rotated["S"][:, 0, 0] == -1)
    assert torch.all(rotated["S"][:, 0, -1] == -1)
    assert torch.all(rotated["D"][:, 0, 0, 0] == 0)
    assert set(rotated["S"].unique().tolist()) <= {-1, 0, 10, 11, 13}
    assert rotated["S"][0, 16, 32] == prepare_batch(raw)["S"][0, 16, 32]  # the centre stays


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def torchvision_resnet_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """Names and shapes of torchvision's resnet18/resnet50 state dict, written from its
    definition (conv1, bn1, layer1..4 of BasicBlock/Bottleneck with downsample.0/1, fc)."""
    shapes: dict[str, tuple[int, ...]] = {"conv1.weight": (64, 3, 7, 7)}

    def bn(prefix: str, c: int) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{name}"] = (c,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    bn("bn1", 64)
    bottleneck = arch == "r50"
    expansion = 4 if bottleneck else 1
    counts = (3, 4, 6, 3) if bottleneck else (2, 2, 2, 2)
    cin = 64
    for stage, (n, planes) in enumerate(zip(counts, (64, 128, 256, 512), strict=True), start=1):
        for j in range(n):
            p = f"layer{stage}.{j}"
            if bottleneck:
                convs = [(cin, planes, 1), (planes, planes, 3), (planes, planes * 4, 1)]
            else:
                convs = [(cin, planes, 3), (planes, planes, 3)]
            for k, (a, b, size) in enumerate(convs, start=1):
                shapes[f"{p}.conv{k}.weight"] = (b, a, size, size)
                bn(f"{p}.bn{k}", b)
            if j == 0 and (stage > 1 or cin != planes * expansion):
                shapes[f"{p}.downsample.0.weight"] = (planes * expansion, cin, 1, 1)
                bn(f"{p}.downsample.1", planes * expansion)
            cin = planes * expansion
    shapes["fc.weight"], shapes["fc.bias"] = (1000, cin), (1000,)
    return shapes


@pytest.mark.parametrize("arch", ["r18", "r50"])
def test_encoder_has_torchvision_names_and_shapes(arch):
    expected = torchvision_resnet_shapes(arch)
    assert len(expected) == {"r18": 122, "r50": 320}[arch]  # torchvision's counts
    state = DilatedResNet(arch).state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        k: v for k, v in expected.items() if not k.startswith("fc.")
    }


def test_state_dict_file_round_trips(tmp_path):
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, shape in torchvision_resnet_shapes("r18").items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(7)
        else:
            state[name] = torch.randn(shape, generator=generator)
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    encoder = DilatedResNet("r18")
    assert load_pretrained(encoder, path) == ([], [])
    for name, value in encoder.state_dict().items():
        assert torch.equal(value, state[name]), name
    del state["layer4.1.bn2.running_var"]
    torch.save(state, path)
    with pytest.raises(RuntimeError, match=r"layer4\.1\.bn2\.running_var"):
        load_pretrained(DilatedResNet("r18"), path)


@pytest.mark.parametrize("arch", ["r18", "r50"])
def test_output_stride_is_8(arch):
    encoder = DilatedResNet(arch, width=8).eval()
    with torch.no_grad():
        assert encoder(torch.randn(1, 3, 64, 128)).shape == (1, encoder.out_channels, 8, 16)
        assert encoder(torch.randn(1, 3, 36, 52)).shape[-2:] == (5, 7)  # ⌈36/8⌉, ⌈52/8⌉
    assert encoder.out_channels == 8 * 8 * (4 if arch == "r50" else 1)
    for name, module in encoder.named_modules():
        if isinstance(module, torch.nn.Conv2d) and name.startswith(("layer3", "layer4")):
            assert module.stride == (1, 1), name
    assert encoder.layer4[-1].conv2.dilation == (4, 4)
    assert encoder.layer3[-1].conv2.dilation == (2, 2)


def test_deeplab_head_outputs():
    z = torch.randn(2, 16, 4, 8)
    seg = DeepLabHead(16, 5, channels=8, out_size=(30, 60), output="log_softmax").eval()
    out = seg(z)
    assert out.shape == (2, 5, 30, 60)
    torch.testing.assert_close(out.exp().sum(1), torch.ones(2, 30, 60))
    normals = DeepLabHead(16, 3, channels=8, output="normalize").eval()(z)
    assert normals.shape == (2, 3, 32, 64)
    torch.testing.assert_close(normals.norm(dim=1), torch.ones(2, 32, 64))
    head = DeepLabHead(16, 1, channels=8)
    assert [c[0].dilation for c in head.aspp.convs[1:4]] == [(12, 12), (24, 24), (36, 36)]
    assert head.train()(z[:1]).shape == (1, 1, 32, 64)  # a last batch of one sample trains


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def one_hot_log_probs(labels: list[list[int]], classes: int) -> torch.Tensor:
    p = torch.nn.functional.one_hot(torch.tensor(labels), classes).float()
    return torch.log(p * 0.9 + 0.05).permute(0, 2, 1).unsqueeze(2)  # (N, C, 1, W)


def test_pixel_accuracy_and_miou_per_sample_and_pooled():
    pred = one_hot_log_probs([[0, 0, 1, 1], [1, 0, 0, 0]], 2)
    target = torch.tensor([[0, 0, 0, 1], [1, 1, -1, -1]]).unsqueeze(1)
    acc = per_sample_values(*pixel_accuracy_ratio(pred, target))
    torch.testing.assert_close(acc, torch.tensor([3 / 4, 1 / 2], dtype=torch.float64))
    miou = per_sample_values(*iou_ratio(pred, target))
    torch.testing.assert_close(miou, torch.tensor([7 / 12, 1 / 4], dtype=torch.float64))
    num, den = iou_ratio(pred, target)
    assert pooled_value(num.sum(0), den.sum(0)) == pytest.approx(0.5)  # dataset-level mIoU
    num, den = pixel_accuracy_ratio(pred, target)
    assert pooled_value(num.sum(0), den.sum(0)) == pytest.approx(4 / 6)


def test_l1_and_angle_metrics():
    target = torch.tensor([[[[2.0, 4.0, 0.0]]], [[[0.0, 0.0, 0.0]]]])
    pred = torch.tensor([[[[3.0, 2.0, 9.0]]], [[[1.0, 1.0, 1.0]]]])
    valid = target > 0
    abs_err = per_sample_values(*masked_l1_ratio(pred, target, valid))
    rel_err = per_sample_values(*masked_l1_ratio(pred, target, valid, relative=True))
    torch.testing.assert_close(abs_err, torch.tensor([1.5, 0.0], dtype=torch.float64))
    torch.testing.assert_close(rel_err, torch.tensor([0.5, 0.0], dtype=torch.float64))
    normal = torch.tensor([0.0, 1.0, 0.0]).view(1, 3, 1, 1).expand(1, 3, 1, 2).clone()
    normal[0, :, 0, 1] = 0.0  # missing
    guess = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1).expand(1, 3, 1, 2)
    angle = per_sample_values(*angle_ratio(guess, normal))
    torch.testing.assert_close(angle, torch.tensor([90.0], dtype=torch.float64))


# --------------------------------------------------------------------------------------------
# NYUv2 fixture: MTAN's layout, channels last, 16×24
# --------------------------------------------------------------------------------------------

NH, NW = 16, 24


def nyu_sample(i: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(100 + i)
    label = rng.integers(-1, 13, size=(NH, NW)).astype(np.float32)
    depth = rng.uniform(0.5, 9.0, size=(NH, NW, 1)).astype(np.float32)
    depth[:2] = 0.0
    normal = rng.normal(size=(NH, NW, 3))
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    normal[-2:] = 0.0
    image = rng.uniform(0, 1, size=(NH, NW, 3)).astype(np.float32)
    return {"image": image, "label": label, "depth": depth, "normal": normal.astype(np.float32)}


def write_nyuv2(root: Path, sizes=(("train", 10), ("val", 3)), channels_last=True) -> Path:
    i0 = 0
    for split, n in sizes:
        for i in range(n):
            for kind, array in nyu_sample(i0 + i).items():
                folder = root / split / kind
                folder.mkdir(parents=True, exist_ok=True)
                if not channels_last and array.ndim == 3:
                    array = np.moveaxis(array, -1, 0)
                np.save(folder / f"{i}.npy", array)
        i0 += n
    return root


@pytest.fixture(scope="module")
def nyu_root(tmp_path_factory) -> Path:
    return write_nyuv2(tmp_path_factory.mktemp("nyuv2"))


def nyu(root: Path, **kwargs) -> NYUv2:
    kwargs.setdefault("cache", root / "cache")
    return NYUv2(data_dir=root, encoder="r18", **kwargs, **SMALL)


def test_nyuv2_loads_mtan_files(nyu_root, tmp_path):
    splits = nyu(nyu_root).splits()
    assert [len(splits[s]) for s in ("train", "val", "test")] == [9, 1, 3]
    order = np.random.RandomState(0).permutation(10)
    sample = nyu_sample(int(order[0]))
    arrays = splits["train"].arrays
    np.testing.assert_array_equal(arrays["x"][0].numpy(), sample["image"].transpose(2, 0, 1))
    np.testing.assert_array_equal(arrays["S"][0].numpy(), sample["label"].astype(np.int8))
    np.testing.assert_array_equal(arrays["D"][0, 0].numpy(), sample["depth"][..., 0])
    np.testing.assert_array_equal(arrays["N"][0].numpy(), sample["normal"].transpose(2, 0, 1))
    test = next(splits["test"].batches(3))
    assert test["S"].dtype == torch.int64
    assert test["x"].shape == (3, 3, NH, NW)
    first_test = nyu_sample(10)["image"].transpose(2, 0, 1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    torch.testing.assert_close(test["x"][0], (torch.from_numpy(first_test) - mean) / std)
    chw = nyu(write_nyuv2(tmp_path / "chw", channels_last=False)).splits()
    assert torch.equal(chw["test"].arrays["N"], splits["test"].arrays["N"])


def test_nyuv2_resize_and_cache(nyu_root, tmp_path, monkeypatch):
    splits = nyu(nyu_root, shape=(12, 8), cache=tmp_path).splits()
    arrays = splits["test"].arrays
    assert arrays["x"].shape == (3, 3, 8, 12)
    assert arrays["N"].shape == (3, 3, 8, 12)
    assert set(arrays["S"].unique().tolist()) <= set(range(-1, 13))
    norms = arrays["N"].norm(dim=1)
    assert torch.all(((norms - 1).abs() < 1e-5) | (norms == 0))
    np.testing.assert_array_equal(arrays["D"][0, 0].numpy(), nyu_sample(10)["depth"][1::2, 1::2, 0])
    import mtopt.problems.nyuv2 as nyu_module

    monkeypatch.setattr(nyu_module, "read_sample", lambda *a: 1 / 0)
    assert torch.equal(
        nyu(nyu_root, shape=(12, 8), cache=tmp_path).splits()["test"].arrays["N"], arrays["N"]
    )


def test_nyuv2_missing_files_name_the_layout(tmp_path, monkeypatch):
    monkeypatch.delenv("MTOPT_NYUV2", raising=False)
    with pytest.raises(FileNotFoundError, match=r"\{train,val\}/image/<i>.npy"):
        NYUv2(data_dir=tmp_path).splits()
    with pytest.raises(FileNotFoundError, match="MTOPT_NYUV2"):
        NYUv2().splits()
    root = write_nyuv2(tmp_path / "partial", sizes=(("train", 3), ("val", 1)))
    (root / "train" / "normal" / "1.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"normal/1\.npy"):
        NYUv2(data_dir=root).splits()
    assert channels_first(np.zeros((5, 6)), 1).shape == (1, 5, 6)
    with pytest.raises(ValueError, match="channels"):
        channels_first(np.zeros((2, 5, 6)), 3)


# --------------------------------------------------------------------------------------------
# One training step per problem, small model
# --------------------------------------------------------------------------------------------


def one_step(problem: Problem) -> None:
    torch.manual_seed(0)
    model = problem.make_model(dropout=0.1)
    train = problem.splits()["train"]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    mto = MultiTaskOptimizer(
        optimizer,
        "unitary",
        shared=model.encoder.parameters(),
        tasks=problem.task_names,
        loss_types=[t.loss_type for t in problem.tasks],
    )
    batch = next(train.batches(4, shuffle=True, generator=torch.Generator().manual_seed(0)))
    before = [p.detach().clone() for p in model.encoder.parameters()]

    def closure():
        z, outputs = model(batch["x"], mto.task_input)
        return Losses({t.name: t.loss(outputs[t.name], batch) for t in problem.tasks}, features=z)

    info = mto.step(closure)
    assert set(info.losses) == set(problem.task_names)
    assert all(np.isfinite(v) and v > 0 for v in info.losses.values())
    assert any(
        not torch.equal(a, b) for a, b in zip(before, model.encoder.parameters(), strict=True)
    )
    for scores in (
        evaluate(model, problem, problem.splits()["val"], batch_size=2),
        evaluate_pooled(model, problem, problem.splits()["test"], batch_size=2),
    ):
        assert set(scores) == set(problem.task_names)
        for task in problem.tasks:
            assert set(scores[task.name]) == {m.name for m in task.metrics}
            assert all(np.isfinite(v) and v >= 0 for v in scores[task.name].values())
        assert 0 <= scores["S"]["pixel_acc"] <= 1
        assert 0 <= scores["S"]["miou"] <= 1


@pytest.mark.parametrize("variant", ["sdi19", "sd7"])
def test_one_cityscapes_training_step(city_root, variant):
    problem = Cityscapes(
        variant, data_dir=city_root, shape=(32, 16), cache=city_root / "cache", **SMALL
    )
    assert problem.augment  # the training batches are augmented
    one_step(problem)


def test_one_nyuv2_training_step(nyu_root):
    one_step(nyu(nyu_root))
